"""The concave gate: its formula, contiguity for any parameters, exact budget at read-off, gradients to mu."""
import math
import random

import pytest
import torch

from gates import (ContiguousGate, blocks_to_layers, budget, initial_centres, neighbours, place_segments, segment_widths,
                   strip, tau_at)


def runs_above(m, t):
    """Number of maximal runs of consecutive layers with m > t."""
    above = [v > t for v in m]
    return sum(1 for i, a in enumerate(above) if a and (i == 0 or not above[i - 1]))


def test_mask_matches_the_formula_by_hand():
    g = ContiguousGate(10, 4, mu=[5.3])
    tau = 0.7
    a, b = 5.3 - 2, 5.3 + 2
    sig = lambda z: 1 / (1 + math.exp(-z))
    want = [sig((i + 0.5 - a) / tau) * sig((b - i - 0.5) / tau) for i in range(10)]
    assert g.removal(tau)[0].tolist() == pytest.approx(want, abs=1e-6)
    assert g.keep(tau).tolist() == pytest.approx([1 - v for v in want], abs=1e-6)


def test_mask_is_one_contiguous_bump_for_any_parameters():
    rng = random.Random(0)
    for _ in range(300):
        L = rng.randint(2, 40)
        k = rng.randint(1, L - 1)
        g = ContiguousGate(L, k, mu=[rng.uniform(-5, L + 5)])
        m = g.removal(10 ** rng.uniform(-2, 1))[0].double()
        peak = int(m.argmax())
        # unimodal: rises to the peak, falls after it, so every level set {m > t} is one run of layers
        assert (m[1: peak + 1] >= m[:peak]).all() and (m[peak + 1:] <= m[peak:-1]).all()
        for t in (0.01, 0.1, 0.5, 0.9):
            assert runs_above(m.tolist(), t) <= 1
        # log-concave where it does not underflow
        lm = m.log()
        ok = torch.isfinite(lm[:-2]) & torch.isfinite(lm[1:-1]) & torch.isfinite(lm[2:]) & (m[1:-1] > 1e-12)
        assert max((lm[2:] - 2 * lm[1:-1] + lm[:-2])[ok].tolist(), default=-1) <= 1e-4


def test_low_temperature_mask_is_the_read_off_block():
    for start in range(0, 25):
        g = ContiguousGate(30, 6, mu=[start + 3.0])
        keep = g.keep(0.05)
        assert g.read_off() == list(range(start, start + 6))
        assert keep[start: start + 6].max() < 1e-3
        assert torch.cat([keep[:start], keep[start + 6:]]).min() > 1 - 1e-3


def test_read_off_has_exactly_k_layers_for_any_parameters():
    rng = random.Random(1)
    for _ in range(500):
        L = rng.randint(3, 40)
        k = rng.randint(1, L - 1)
        S = rng.randint(1, min(k, 4))
        g = ContiguousGate(L, k, S, mu=[rng.uniform(-10, L + 10) for _ in range(S)])
        for blocks in [g.blocks()] + sorted(neighbours(g.blocks(), L, radius=2)):
            layers = blocks_to_layers(blocks)
            assert len(layers) == k and len(set(layers)) == k and 0 <= min(layers) and max(layers) < L
        if S == 1:
            layers = g.read_off()
            assert layers == list(range(layers[0], layers[0] + k))


def test_read_off_rounds_the_window_start():
    assert ContiguousGate(30, 6, mu=[20.4]).read_off() == list(range(17, 23))  # a = 17.4
    assert ContiguousGate(30, 6, mu=[20.6]).read_off() == list(range(18, 24))  # a = 17.6
    assert ContiguousGate(30, 6, mu=[1.0]).read_off() == list(range(0, 6))  # clipped at the front
    assert ContiguousGate(30, 6, mu=[29.0]).read_off() == list(range(24, 30))  # and at the back


def test_overlapping_segments_are_pushed_apart():
    assert place_segments([5, 5], [3, 3], 20) == ((5, 3), (8, 3))
    assert place_segments([18, 17], [2, 2], 20) == ((16, 2), (18, 2))
    g = ContiguousGate(12, 6, 2, mu=[6.0, 6.0])  # both segments want start round(4.5) = 5
    assert g.read_off() == list(range(5, 11))


def test_neighbours():
    assert neighbours(((3, 6),), 30) == {((2, 6),), ((3, 6),), ((4, 6),)}
    assert neighbours(((0, 6),), 30) == {((0, 6),), ((1, 6),)}
    assert ((4, 2), (6, 3)) in neighbours(((5, 2), (7, 3)), 30)


def test_gradients_reach_mu():
    g = ContiguousGate(30, 6, 2, mu=[8.3, 20.7])
    target = torch.zeros(30)
    target[10:13] = 1
    loss = ((1 - g.keep(0.8)) - target).pow(2).sum()
    loss.backward()
    assert torch.isfinite(g.mu.grad).all() and (g.mu.grad.abs() > 1e-4).all()
    # moving the first centre toward the target lowers the loss: the gradient says so
    assert g.mu.grad[0] < 0


def test_clamp_keeps_the_window_inside():
    g = ContiguousGate(30, 6, mu=[-4.0])
    g.clamp_()
    assert float(g.mu.detach()) == 3.0
    g = ContiguousGate(30, 6, mu=[40.0])
    g.clamp_()
    assert float(g.mu.detach()) == 27.0


def test_budget_and_its_errors():
    assert budget(30, prune_ratio=0.2) == 6 and budget(30, prune_ratio=0.3) == 9 and budget(30, prune_layers=29) == 29
    for bad in (dict(prune_layers=0), dict(prune_layers=30), dict(prune_layers=31), dict(prune_ratio=0.01),
                dict(prune_ratio=1.0), dict(), dict(prune_layers=3, prune_ratio=0.1)):
        with pytest.raises(ValueError):
            budget(30, **bad)
    with pytest.raises(ValueError):
        segment_widths(3, 4)
    assert segment_widths(7, 3) == [3, 2, 2]


def test_schedule_and_starts():
    assert tau_at(0, 40) == pytest.approx(2.0) and tau_at(39, 40) == pytest.approx(0.05)
    assert tau_at(10, 40) > tau_at(11, 40)
    mus = [initial_centres(30, [6], r, 4)[0] for r in range(4)]
    assert mus == pytest.approx([6.0, 12.0, 18.0, 24.0])
    assert strip(torch.tensor([1.0, 0.0, 0.5])) == "| @+|"
