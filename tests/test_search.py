"""The search: cached-teacher KL against full forwards, chunked gradients, finding a planted redundant block, the CLI."""
import json
import random

import pytest
import torch

import baselines
import load_weights
import gates
import search
from conftest import FIXTURES
from teacher import build_teacher, kl_backward, log_probs, removed_kl, token_kl


def teacher_for(model, n=4, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return build_teacher(model, torch.randint(0, model.cfg.vocab_size, (n, T), generator=g))


def full_forward_kl(model, tokens, keep):
    """KL(dense || keep-weighted) through model.forward: independent of teacher.py's layer-boundary cache."""
    with torch.no_grad():
        p = model(tokens).float().log_softmax(-1)
        q = model(tokens, keep=keep).float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("removed", [[2, 3], [1, 4], [0, 1, 2], [5]])
def test_cached_removed_kl_equals_full_forward(tiny_dir, removed):
    model, _ = load_weights.load(tiny_dir)
    teacher = teacher_for(model)
    keep = torch.ones(6)
    keep[removed] = 0
    want = full_forward_kl(model, teacher.tokens, keep)
    assert want > 1e-4
    assert removed_kl(model, teacher, removed, batch=3, chunk=50) == pytest.approx(want, rel=1e-4)


def test_chunked_kl_gradient_equals_plain_autograd():
    model, _ = load_weights.load(FIXTURES / "tiny-llama3")
    teacher = teacher_for(model, n=2, T=24)
    keep = torch.tensor([1.0, 0.9, 0.3, 0.5, 1.0, 0.8], requires_grad=True)
    h = search.run_layers(model, teacher.hidden[0], 0, keep=keep)
    loss = kl_backward(model, h, teacher.final, chunk=7)
    grad_chunked = keep.grad.clone()
    keep.grad = None
    # the same loss in one piece, straight through model.forward, the teacher's log-probs from its logits
    logq = model(teacher.tokens, keep=keep).float().log_softmax(-1)
    logp = model(teacher.tokens).float().log_softmax(-1)
    plain = (logp.exp() * (logp - logq)).sum(-1).mean()
    plain.backward()
    assert loss == pytest.approx(float(plain.detach()), rel=1e-5)
    torch.testing.assert_close(grad_chunked, keep.grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def make_redundant(model, block):
    """Zero the output projections of `block`: those layers then return their input unchanged."""
    with torch.no_grad():
        for i in block:
            model.layers[i].self_attn.o_proj.weight.zero_()
            model.layers[i].mlp.down_proj.weight.zero_()
    return model


@pytest.mark.parametrize("name,block", [("tiny-llama2", [4, 5]), ("tiny-qwen3", [0, 1]), ("tiny-qwen2", [0, 1, 2])])
def test_search_finds_a_planted_redundant_block(name, block):
    model = make_redundant(load_weights.load(FIXTURES / name)[0], block)
    teacher = teacher_for(model, n=4, T=32)
    ranked = baselines.exhaustive(model, teacher, len(block), quiet=True)
    assert ranked[0]["removed_layers"] == block and ranked[0]["kl"] < 1e-9 < ranked[1]["kl"]
    # one start in the middle (it reads off layers 2.. at first) and radius 0 (no neighbour check):
    # the gate itself has to travel to the block
    assert search.make_gates(6, len(block), 1, 1)[0].read_off()[0] == 2
    result = search.search(model, teacher, len(block), starts=1, steps=24, batch_size=2, radius=0, log_every=100)
    assert result["removed_layers"] == block and result["kl"] < 1e-9


def test_two_segments_read_off_exactly_k():
    model, _ = load_weights.load(FIXTURES / "tiny-llama2")
    teacher = teacher_for(model, n=2, T=16)
    result = search.search(model, teacher, 3, segments=2, starts=2, steps=4, log_every=100)
    assert len(result["removed_layers"]) == 3 and len(set(result["removed_layers"])) == 3
    assert len(result["candidates"]) > 1 and result["kl"] == min(c["kl"] for c in result["candidates"])


def test_cli_report_and_excise(tmp_path):
    ckpt = FIXTURES / "tiny-qwen2"
    search.main(["--ckpt", str(ckpt), "--prune-ratio", "0.34", "--steps", "5", "--starts", "2", "--nsamples", "3",
                 "--seqlen", "16", "--out", str(tmp_path / "run"), "--excise", str(tmp_path / "pruned")])
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert len(report["removed_layers"]) == 2 and report["budget"] == {"layers": 2, "ratio": 0.3333}
    assert len(report["trajectory"]) == 5 and len(report["trajectory"][0]["mu"]) == 2
    chosen = [c for c in report["candidates"] if c["removed_layers"] == report["removed_layers"]]
    assert chosen[0]["kl"] == report["kl"] == min(c["kl"] for c in report["candidates"])
    assert report["wall_time_s"]["total"] > 0 and report["settings"]["steps"] == 5
    assert report["model"]["fingerprint"]["num_layers"] == 6
    pruning = json.loads((tmp_path / "pruned" / "pruning.json").read_text())
    assert pruning["removed_layers"] == report["removed_layers"] and pruning["method"] == "clp-gate"
    assert load_weights.load(tmp_path / "pruned")[0].cfg.num_layers == 4


@pytest.mark.parametrize("argv,msg", [(["--prune-layers", "0"], "out of range"), (["--prune-layers", "6"], "out of range"),
                                      (["--prune-ratio", "0.05"], "out of range"), ([], "exactly one of"),
                                      (["--prune-layers", "2", "--prune-ratio", "0.3"], "exactly one of"),
                                      (["--prune-layers", "2", "--segments", "3"], "--segments 3")])
def test_cli_bad_budget(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit):
        search.main(["--ckpt", str(FIXTURES / "tiny-llama2"), "--steps", "1", "--nsamples", "2", "--seqlen", "8",
                     "--out", str(tmp_path / "o")] + argv)
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_token_kl_is_zero_for_the_teacher_itself():
    model, _ = load_weights.load(FIXTURES / "tiny-llama2")
    teacher = teacher_for(model, n=1, T=8)
    h = teacher.hidden[-1].reshape(-1, model.cfg.hidden_size)
    kl = token_kl(model, h, log_probs(model, h))
    assert kl.abs().max() < 1e-5


def test_read_off_walks_to_a_local_minimum_of_the_discrete_kl(monkeypatch):
    # a made-up landscape over block starts: valleys at 7 (depth 1) and 1 (depth 0.5, not reachable downhill from 3)
    landscape = {s: abs(s - 7) + 1.0 for s in range(11)} | {1: 0.5, 2: 6.0}
    monkeypatch.setattr(search, "removed_kl", lambda model, teacher, layers: landscape[layers[0]])
    gate = search.ContiguousGate(12, 2, mu=[4.0])  # reads off block 3-4
    model = type("M", (), {})()
    cands = search.choose_block(model, None, {0: gate}, 12, radius=1)
    assert cands[0]["removed_layers"] == [7, 8] and cands[0]["kl"] == 1.0
    assert sorted(c["removed_layers"][0] for c in cands) == [2, 3, 4, 5, 6, 7, 8]
    assert [c["read_off_by_starts"] for c in cands if c["removed_layers"] == [3, 4]] == [[0]]


def test_one_pass_baselines_see_a_planted_identity_block():
    model = make_redundant(load_weights.load(FIXTURES / "tiny-llama3")[0], [2, 3])
    teacher = teacher_for(model)
    bi = baselines.block_influence(teacher)
    assert bi[2] < 1e-6 and bi[3] < 1e-6 and min(bi[0], bi[1], bi[4], bi[5]) > 1e-3
    assert baselines.choose("block-influence", model, teacher, 2)[0] == [2, 3]
    d = baselines.angular_distance(teacher, 2)
    assert len(d) == 5 and d[2] < 1e-3 < min(d[:2] + d[3:])
    assert baselines.choose("angular", model, teacher, 2)[0] == [2, 3]
    assert baselines.choose("tail", model, teacher, 2)[0] == [3, 4]
    a, b = (baselines.choose("random", model, teacher, 3, seed=s)[0] for s in (7, 7))
    assert a == b and len(a) == 3 and a == list(range(a[0], a[0] + 3))


def test_calibration_windows_come_from_the_tokenized_text(tmp_path):
    from data import calibration_windows

    class CharTokenizer:
        def encode(self, text, bos=False):
            return [ord(c) for c in text]

    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(2000))
    (tmp_path / "calib.txt").write_text(text)
    tokens, held, desc = calibration_windows(CharTokenizer(), str(tmp_path / "calib.txt"), 5, 64, seed=3)
    again, _, _ = calibration_windows(CharTokenizer(), str(tmp_path / "calib.txt"), 5, 64, seed=3)
    assert tokens.shape == (5, 64) and torch.equal(tokens, again) and "calib.txt" in desc and held is None
    for row in tokens.tolist():
        assert "".join(map(chr, row)) in text
    # with held-out windows: training windows from the first 90% of the text, held-out ones from the last 10%
    train, held, _ = calibration_windows(CharTokenizer(), str(tmp_path / "calib.txt"), 5, 64, seed=3, held_out=2)
    assert train.shape == (5, 64) and held.shape == (2, 64)
    for row in train.tolist():
        assert "".join(map(chr, row)) in text[:1800]
    for row in held.tolist():
        assert "".join(map(chr, row)) in text[1800:]


def test_read_off_also_scores_the_blocks_the_starts_visited(monkeypatch):
    # the landscape above: the walk from 3-4 ends in the valley at 7; the deeper narrow one at 1 sits behind a bump
    landscape = {s: abs(s - 7) + 1.0 for s in range(11)} | {1: 0.5, 2: 6.0}
    monkeypatch.setattr(search, "removed_kl", lambda model, teacher, layers: landscape[layers[0]])
    gate = search.ContiguousGate(12, 2, mu=[4.0])
    # start 1's centre went 2.4 -> 3.4 -> 3.6 -> 4.1: it visited blocks 1-2, 2-3, 3-4 (twice), then was stopped
    trajectory = [{"mu": {0: [4.0], 1: [m]}} for m in (2.4, 3.4, 3.6, 4.1)]
    seeds = search.visited_blocks(trajectory, [2], 12)
    assert seeds == {((3, 2),), ((2, 2),), ((1, 2),)}
    cands = search.choose_block(type("M", (), {})(), None, {0: gate}, 12, radius=1, seeds=seeds)
    assert cands[0]["removed_layers"] == [1, 2] and cands[0]["kl"] == 0.5
    # without the seeds (v1) the same walk stops in the shallower valley
    v1 = search.choose_block(type("M", (), {})(), None, {0: gate}, 12, radius=1)
    assert v1[0]["removed_layers"] == [7, 8]


def test_merge_moves_let_the_two_segment_walk_reach_a_contiguous_optimum(monkeypatch):
    """A landscape where 4-6,13-15 is a local minimum of one-layer moves and the contiguous 13-18 (a two-block
    placement whose blocks touch) is the optimum: only the walk with merge moves (v3) gets there."""
    import gates

    def kl(model, teacher, layers):
        if list(layers) == list(range(13, 19)):
            return 0.5
        (a, _), (b, _) = gates_of(layers)
        return 1 + 0.1 * abs(a - 4) + 0.1 * abs(b - 13)

    def gates_of(layers):  # the two width-3 blocks of a placement (a wider block counts as two touching ones)
        return ((layers[0], 3), (layers[3], 3))

    assert gates.neighbours(((4, 3), (13, 3)), 30, 1, merge=True) - gates.neighbours(((4, 3), (13, 3)), 30, 1) == {
        ((10, 3), (13, 3)), ((13, 3), (16, 3)), ((1, 3), (4, 3)), ((4, 3), (7, 3))}  # by hand: i next to j, both sides
    monkeypatch.setattr(search, "removed_kl", kl)
    g = search.ContiguousGate(30, 6, segments=2, mu=[5.5, 14.5])  # blocks 4-6 and 13-15
    assert g.blocks() == ((4, 3), (13, 3))
    without = search.choose_block(None, None, {0: g}, 30, radius=1, merge=False, rounds=())
    with_merge = search.choose_block(None, None, {0: g}, 30, radius=1, rounds=())
    assert without[0]["removed_layers"] == [4, 5, 6, 13, 14, 15]
    assert with_merge[0]["removed_layers"] == list(range(13, 19)) and with_merge[0]["kl"] == 0.5


def test_boundary_moves_by_hand():
    import gates
    # blocks 2-3 and 10 in 12 layers: an end layer (2, 3 or 10) goes next to a block (1, 4, 9 or 11), at most 2 blocks
    assert gates.boundary_moves([2, 3, 10], 12, 2) == {
        (3, 4, 10), (3, 9, 10), (3, 10, 11), (1, 2, 10), (2, 9, 10), (2, 10, 11), (1, 2, 3), (2, 3, 4), (2, 3, 9), (2, 3, 11)}
    assert gates.boundary_moves([4, 5, 6], 12, 1) == {(3, 4, 5), (5, 6, 7)}  # one block: the shifts only
    assert gates.boundary_moves([0, 11], 12, 2) == {(1, 11), (10, 11), (0, 1), (0, 10)}  # nothing leaves [0, L)
    # a block moves anywhere it does not overlap the other: 2-3 to 8 starts (not 9 or 10), 10 to 9 places
    moves = gates.relocations([2, 3, 10], 12)
    assert len(moves) == 8 + 9 and (8, 9, 10) in moves and (2, 3, 11) in moves and (9, 10, 11) not in moves


def test_swaps_by_hand():
    import gates
    # 4-6 in 8 layers, at most 2 blocks: put back 4 (or 6) and remove any of 0-3 or 7; put back 5 and remove 3 or 7
    assert gates.swaps([4, 5, 6], 8, 2) == {(0, 5, 6), (1, 5, 6), (2, 5, 6), (3, 5, 6), (5, 6, 7), (0, 4, 5), (1, 4, 5),
                                            (2, 4, 5), (3, 4, 5), (4, 5, 7), (3, 4, 6), (4, 6, 7)}
    rng = random.Random(0)
    for _ in range(50):  # the swaps contain the boundary moves; from one block of 2 or more they are the same sets
        L = rng.randint(4, 14)
        layers = sorted(rng.sample(range(L), rng.randint(1, L - 1)))
        for S in (1, 2, 3):
            assert gates.boundary_moves(layers, L, S) <= gates.swaps(layers, L, S)
        if len(gates.layers_to_blocks(layers)) == 1 and len(layers) > 1:
            assert gates.swaps(layers, L, 1) == gates.boundary_moves(layers, L, 1)


def test_swaps_let_the_walk_split_a_block(monkeypatch):
    """A landscape like smollm2-135m's at k = 3: the one block 16-18 beats every placement a boundary move or a
    relocation away, and the way down to the optimum 13-14,17 (2 + 1) splits it (13,16-17, then 13-14,17): the
    shifts alone stop at 16-18, a round of splits after them goes on to the optimum."""
    path = {(13, 14, 17): 0.367, (13, 16, 17): 0.38, (16, 17, 18): 0.395}

    def kl(model, teacher, layers):
        return path.get(tuple(layers), 1 + 0.001 * abs(min(layers) - 16))

    monkeypatch.setattr(search, "removed_kl", kl)
    g = search.ContiguousGate(30, 3, segments=2, mu=[16.0, 18.5])  # blocks 15-16 and 18
    assert g.blocks() == ((15, 2), (18, 1))
    v5 = search.choose_block(None, None, {0: g}, 30, radius=1, rounds=((search.shifts, 1),))
    v6 = search.choose_block(None, None, {0: g}, 30, radius=1, rounds=((search.shifts, 1), (search.splits, 1)))
    assert v5[0]["removed_layers"] == [16, 17, 18] and v6[0]["removed_layers"] == [13, 14, 17]
    assert v6[0]["kl"] == 0.367 and len(v6) > len(v5)


def test_a_beam_of_two_steps_over_one_placement_uphill(monkeypatch):
    """smollm2-135m at k = 3, measured: 16-18 (0.395) is a local minimum of every swap (the best, 13,16-17, has
    0.420), and 13-14,17 (0.367) is one swap beyond that one. A beam-1 round of splits stops at 16-18; the third
    round of RESHAPE also expands the second-best placement and gets there, then stops when the two best have been
    expanded."""
    path = {(13, 14, 17): 0.367, (16, 17, 18): 0.395, (13, 16, 17): 0.420}

    def kl(model, teacher, layers):
        return path.get(tuple(layers), 1 + 0.001 * abs(min(layers) - 16))

    monkeypatch.setattr(search, "removed_kl", kl)
    g = search.ContiguousGate(30, 3, segments=2, mu=[16.0, 18.5])
    v6 = search.choose_block(None, None, {0: g}, 30, radius=1, rounds=search.RESHAPE[:2])
    v7 = search.choose_block(None, None, {0: g}, 30, radius=1)  # RESHAPE, the default
    assert v6[0]["removed_layers"] == [16, 17, 18] and v7[0]["removed_layers"] == [13, 14, 17]
    assert {tuple(c["removed_layers"]) for c in v6} < {tuple(c["removed_layers"]) for c in v7}


def test_boundary_moves_let_the_two_segment_walk_change_the_widths(monkeypatch):
    """The cheapest two blocks are 2-3 and 10-15 (widths 2 + 6); the gate's segments have widths 4 + 4, so the
    read-off walk stops at a 4 + 4 placement or a contiguous 8; a round of boundary moves hands layers from one
    block to the other and reaches the optimum, scoring each layer set once."""
    target, calls = {2, 3, 10, 11, 12, 13, 14, 15}, []

    def kl(model, teacher, layers):
        calls.append(tuple(layers))
        return 1 + 0.05 * len(set(layers) ^ target)

    monkeypatch.setattr(search, "removed_kl", kl)
    g = search.ContiguousGate(20, 8, segments=2, mu=[4.0, 12.0])  # blocks 2-5 and 10-13
    assert g.blocks() == ((2, 4), (10, 4))
    v3 = search.choose_block(None, None, {0: g}, 20, radius=1, rounds=())
    assert v3[0]["kl"] >= 1.2  # two layers in, two out, whatever 4 + 4 or contiguous placement
    calls.clear()
    v4 = search.choose_block(None, None, {0: g}, 20, radius=1, rounds=((gates.boundary_moves, 1),))
    assert v4[0]["removed_layers"] == sorted(target) and v4[0]["kl"] == 1.0
    assert len(calls) == len(set(calls))  # no layer set scored twice


def test_relocations_let_a_block_leave_its_half(monkeypatch):
    """Blocks 2-3 and 10-15 of a planted landscape whose optimum is 10-15 with 25-26: one boundary move at a time
    only raises the KL (a local minimum of boundary moves alone), one relocation reaches the optimum (shifts)."""
    target = {10, 11, 12, 13, 14, 15, 25, 26}

    def kl(model, teacher, layers):
        layers = set(layers)
        return 0.5 if layers == target else 1 + 0.05 * len(layers ^ {2, 3, 10, 11, 12, 13, 14, 15})

    monkeypatch.setattr(search, "removed_kl", kl)
    g = search.ContiguousGate(30, 8, segments=2, mu=[4.0, 12.0])  # blocks 2-5 and 10-13
    v4 = search.choose_block(None, None, {0: g}, 30, radius=1, rounds=((gates.boundary_moves, 1),))
    v5 = search.choose_block(None, None, {0: g}, 30, radius=1, rounds=((search.shifts, 1),))
    assert v4[0]["removed_layers"] == [2, 3, 10, 11, 12, 13, 14, 15] and v4[0]["kl"] == 1.0
    assert v5[0]["removed_layers"] == sorted(target) and v5[0]["kl"] == 0.5


