"""SLEB, Shortened-LLaMA (PPL, Taylor) and the S-segment oracle: planted identity layers, independent references."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import baselines
import importance
import load_weights
import search
from conftest import FIXTURES
from teacher import build_teacher
from test_search import make_redundant, teacher_for


@torch.no_grad()
def sampled_teacher(model, n=16, T=64, seed=0):
    """Calibration windows sampled from the model itself: then no removal can lower the expected NLL,
    and perplexity-ranked methods see a planted identity layer as the cheapest to remove."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.cfg.vocab_size, (n, 1), generator=g)
    while x.shape[1] < T:
        p = model(x)[:, -1].float().softmax(-1)  # (n, V)
        x = torch.cat([x, torch.multinomial(p, 1, generator=g)], dim=1)
    return build_teacher(model, x)


def full_forward_nll(model, tokens, removed):
    """Mean next-token NLL through model.forward with keep = 0 on `removed`: independent of the streaming pass."""
    keep = torch.ones(model.cfg.num_layers)
    keep[list(removed)] = 0
    with torch.no_grad():
        logits = model(tokens, keep=keep)[:, :-1]
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1)))


def test_single_removal_nll_equals_full_forwards():
    model, _ = load_weights.load(FIXTURES / "tiny-llama3")
    teacher = teacher_for(model, n=3, T=16)
    for removed in [(), (0, 4)]:
        got = importance.single_removal_nll(model, teacher, removed, batch=2)
        assert sorted(got) == [i for i in range(6) if i not in removed]
        for i, v in got.items():
            assert v == pytest.approx(full_forward_nll(model, teacher.tokens, set(removed) | {i}), rel=1e-5)


def test_sleb_k1_equals_exhaustive_by_perplexity_and_re_scores_after_each_removal():
    model, _ = load_weights.load(FIXTURES / "tiny-qwen2")
    teacher = teacher_for(model, n=3, T=16, seed=1)
    # SLEB ranks by calibration perplexity: its k = 1 choice is the exhaustive k = 1 optimum *by perplexity*
    by_ppl = {i: full_forward_nll(model, teacher.tokens, {i}) for i in range(6)}
    order, trace = importance.sleb(model, teacher, 1, quiet=True)
    assert order == [min(by_ppl, key=by_ppl.get)] and trace[0] == pytest.approx(min(by_ppl.values()), rel=1e-5)
    # step 2 is the best second layer given the first, scored again (not the runner-up of step 1)
    order2, trace2 = importance.sleb(model, teacher, 2, quiet=True)
    given = {i: full_forward_nll(model, teacher.tokens, {order[0], i}) for i in range(6) if i != order[0]}
    assert order2 == order + [min(given, key=given.get)] and trace2[1] == pytest.approx(min(given.values()), rel=1e-5)
    # resuming from a stored order continues the same greedy path
    assert importance.sleb(model, teacher, 2, start=order, quiet=True)[0] == order2


def test_sleb_k1_equals_exhaustive_k1_on_a_planted_identity_layer():
    # a layer that is the identity has KL 0 and the dense perplexity when removed: both rankings put it first
    model = make_redundant(load_weights.load(FIXTURES / "tiny-qwen3")[0], [3])
    teacher = sampled_teacher(model)
    assert importance.sleb(model, teacher, 1, quiet=True)[0] == [3]
    assert baselines.exhaustive(model, teacher, 1, quiet=True)[0]["removed_layers"] == [3]


@pytest.fixture(scope="module")
def planted():
    model = make_redundant(load_weights.load(FIXTURES / "tiny-llama2")[0], [2, 3])
    return model, sampled_teacher(model)


@pytest.mark.parametrize("method", ["exhaustive", "block-influence", "angular", "sleb", "shortened-ppl", "shortened-taylor"])
def test_every_method_that_can_finds_a_planted_identity_block(planted, method):
    # tail and random cannot: they never look at the model
    model, teacher = planted
    assert baselines.choose(method, model, teacher, 2)[0] == [2, 3]


def test_taylor_importance_of_a_one_layer_toy():
    model, _ = load_weights.load(FIXTURES / "tiny-llama2")
    model.layers = model.layers[:1]
    model.cfg.num_layers = 1
    teacher = teacher_for(model, n=2, T=12)
    got = importance.taylor_importance(model, teacher)
    # by hand: L = mean cross-entropy of model.forward, I = sum_W |dL/dW * W| over the one layer's weights
    params = dict(model.layers[0].named_parameters())
    for p in params.values():
        p.requires_grad_(True)

    def loss():
        logits = model(teacher.tokens)[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), teacher.tokens[:, 1:].reshape(-1))

    grads = torch.autograd.grad(loss(), list(params.values()))
    want = sum(float((g * p.detach()).abs().sum()) for g, p in zip(grads, params.values()))
    assert len(got) == 1 and got[0] == pytest.approx(want, rel=1e-4)
    # and each term is a derivative: a central difference on single weights reproduces dL/dW * W
    W = params["mlp.down_proj.weight"]
    g = dict(zip(params, grads))["mlp.down_proj.weight"]
    with torch.no_grad():
        for r, c in [(0, 0), (5, 17), (63, 100)]:
            eps, w0 = 1e-2, float(W[r, c])
            W[r, c] = w0 + eps
            up = float(loss())
            W[r, c] = w0 - eps
            down = float(loss())
            W[r, c] = w0
            assert (up - down) / (2 * eps) * w0 == pytest.approx(float(g[r, c]) * w0, rel=2e-2, abs=1e-7)


def test_taylor_importance_is_zero_for_an_identity_layer_and_leaves_no_gradients():
    model = make_redundant(load_weights.load(FIXTURES / "tiny-qwen2")[0], [1])
    scores = importance.taylor_importance(model, teacher_for(model, n=2, T=12), batch=1)
    assert scores[1] == 0 and min(scores[:1] + scores[2:]) > 1e-4
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def runs_of(layers):
    """Widths of the maximal contiguous runs of a sorted layer list."""
    runs = []
    for i in layers:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return sorted(b - a + 1 for a, b in runs)


@pytest.mark.parametrize("L,widths", [(6, [2, 1]), (8, [2, 2]), (10, [3, 2]), (30, [3, 3]), (30, [5, 4])])  # 325 and 484 at L = 30
def test_two_segment_placements_are_counted_right(L, widths):
    got = baselines.placements(L, widths)
    k = sum(widths)
    if L <= 10:
        # independently: every k-subset whose runs are one block of k, or exactly the two widths
        want = [s for s in itertools.combinations(range(L), k) if runs_of(s) in ([k], sorted(widths))]
        assert got == want
    assert all(runs_of(s) in ([k], sorted(widths)) for s in got) and len(set(got)) == len(got)
    m = 1 if widths[0] == widths[1] else 2
    assert len(got) == m * math.comb(L - k + 1, 2) + L - k + 1  # the formula of the docstring
    if (L, widths) == (6, [2, 1]):
        assert len(got) == 16  # by hand: 12 split placements ({0,1}+{3}, ..., {5}+...) and 4 blocks of 3


def test_two_segment_oracle_and_gate_find_a_planted_pair_of_blocks():
    model = make_redundant(load_weights.load(FIXTURES / "tiny-llama2")[0], [1, 2, 4])
    teacher = teacher_for(model, n=4, T=32)
    ranked = baselines.exhaustive_segments(model, teacher, 3, 2, quiet=True)
    assert len(ranked) == 16 and ranked[0]["removed_layers"] == [1, 2, 4] and ranked[0]["kl"] < 1e-9 < ranked[1]["kl"]
    result = search.search(model, teacher, 3, segments=2, starts=2, steps=24, batch_size=2, log_every=100)
    assert result["removed_layers"] == [1, 2, 4] and result["kl"] < 1e-9


@pytest.mark.parametrize("max_cache", [0, 2 ** 30])  # teacher log-probs recomputed per placement, or kept
def test_shared_placement_scores_equal_removed_kl_exactly(max_cache):
    """The oracle's shared-prefix scoring gives the very numbers of scoring each placement alone, for single
    blocks, two and three segments, visited in any order."""
    from teacher import removed_kl
    model = load_weights.load(FIXTURES / "tiny-llama2")[0]
    teacher = teacher_for(model, n=6, T=16)  # two batches of 4 windows, the second one short
    L = model.cfg.num_layers
    sets = baselines.placements(L, [2, 1]) + [s for s in baselines.placements(L, [1, 1, 1]) if len(runs_of(s)) == 3]
    sets = sets[::-1]
    got = baselines.score_placements(model, teacher, sets, chunk=20, quiet=True, max_cache=max_cache)
    assert len(got) == len(sets) >= 20
    assert got == [removed_kl(model, teacher, s, chunk=20) for s in sets]
    assert len(set(got)) > len(got) // 2  # distinct placements give distinct KLs: the check compares real values
