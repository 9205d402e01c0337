"""bench_compare.py end to end on a tiny model with a real tokenizer: the table, the picture, and a resume
that recomputes nothing."""
import json
import re
from types import SimpleNamespace

import pytest
import torch

import load_weights
import save_weights
import search
from benchmarks import bench_compare, compare_cells, gate_cells
from conftest import DATA, need
from model import Transformer, hf_state_dict


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    """A seeded random 4-layer, 64-wide llama with the embedded model's tokenizer (its vocabulary of 49,152)."""
    src = load_weights.resolve(load_weights.DEFAULT)
    config = json.loads((src / "config.json").read_text()) | {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 2048}
    torch.manual_seed(0)
    model = Transformer(load_weights.config_from_dict(config))
    with torch.no_grad():  # GPT-2's init: finite perplexities on a 49k vocabulary
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    tensors = {k: v.detach().clone() for k, v in hf_state_dict(model).items()}
    save_weights.save_checkpoint(out, config, tensors, source_dir=src)
    return out


@pytest.fixture
def small_data(tmp_path, monkeypatch):
    """$CLP_DATA with the first 30,000 characters of WikiText-2 test and valid (tokenizing all of it takes long)
    and the real PIQA and BoolQ files."""
    root = tmp_path / "data"
    (root / "wikitext-2-raw").mkdir(parents=True)
    for f in ("wiki.test.raw", "wiki.valid.raw"):
        text = (need(DATA / "wikitext-2-raw" / f)).read_text(encoding="utf-8")[:30000]
        (root / "wikitext-2-raw" / f).write_text(text, encoding="utf-8")
    for task in ("piqa", "boolq"):
        (root / task).symlink_to(need(DATA / task))
    monkeypatch.setenv("CLP_DATA", str(root))
    return root


def test_runs_end_to_end_and_resumes_without_recomputing(tiny_with_tokenizer, small_data, tmp_path, monkeypatch):
    argv = ["--ckpt", str(tiny_with_tokenizer), "--ratios", "0.5", "--methods", "clp-gate,exhaustive,clp-gate-s2,sleb,random-0,random-1",
            "--nsamples", "2", "--seqlen", "32", "--ppl-windows", "1", "--ppl-seqlen", "128", "--tasks", "piqa,boolq", "--limit", "3",
            "--steps", "2", "--lrs", "1e-3,3e-3", "--batch-size", "1", "--tune-nsamples", "2", "--latency-seqlen", "16",
            "--latency-runs", "1", "--results", str(tmp_path / "compare.json"), "--gate-results", str(tmp_path / "gate.json"),
            "--work", str(tmp_path / "work"), "--markdown", str(tmp_path / "BENCH.md"), "--plot", str(tmp_path / "compare.png")]
    bench_compare.main(argv)
    text = (tmp_path / "BENCH.md").read_text()
    assert "<!-- BEGIN compare -->" in text and "| 50% | sleb |" in text and "not run" not in text
    assert "endpoints, " in text and "CLP ppl" in text and "| random, mean ± sd of 2 seeds |" in text
    res = json.loads((tmp_path / "compare.json").read_text())
    # a non-contiguous choice also gets LoRA on all layers
    sleb = next(v["order"] for k, v in res.items() if k.endswith("|sleb"))
    assert ("LoRA r" in text) == (max(sleb) - min(sleb) > 1)
    gate = json.loads((tmp_path / "gate.json").read_text())
    assert sorted(v["S"] for v in gate.values() if v.get("kind") == "gate") == [1, 2]
    assert sum(v.get("kind") == "oracle" for v in gate.values()) == 1  # exhaustive-s2 was not asked for
    assert "Two segments: " in text
    # the at-a-glance table: one column per family asked for (random: its mean), CLP's place among them
    head = next(line for line in text.splitlines() if line.startswith("| ratio (layers removed) |"))
    assert head.split(" | ")[1:5] == ["CLP, one block", "CLP, two segments", "SLEB", "tail / random"]
    glance = next(line for line in text.splitlines() if line.startswith("| 50% (2 of 4) | "))
    assert glance.endswith(" of 4 |") and "†" in glance and "random, mean of 2" in glance
    assert "| 0% | 4 | " in text and "| 50% | 2 | " in text  # the interleaved speed table: dense and pruned
    # SLEB ran its greedy steps once, to the largest budget
    assert [len(v["order"]) for k, v in res.items() if k.endswith("|sleb")] == [2]
    assert not list((tmp_path / "work").glob("*/config.json"))  # evaluated checkpoints are removed
    if (tmp_path / "compare.png").exists():
        assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # the whole test set for CLP's rows: each repair's chosen lr (only) is tuned again, to the same held-out KL
    tuned_again, tune_one = [], compare_cells.tune_one
    monkeypatch.setattr(compare_cells, "tune_one", lambda *a: tuned_again.append(a[1:]) or tune_one(*a))
    full = argv[:5] + ["clp-gate"] + argv[6:] + ["--full-ppl"]
    bench_compare.main(full)
    res = json.loads((tmp_path / "compare.json").read_text())
    rows = {k: v for k, v in res.items() if "|wt2[:all]|ppl-only|" in k}
    gate = [k for k, v in res.items() if k.endswith("|endpoints|lr0.001")][0].split("|")[4]
    assert sorted(rows) == sorted(k for k in rows if f"|{gate}|" in k or k.endswith("|dense|untuned")) and len(rows) == 3
    assert len(tuned_again) == 1 and tuned_again[0][1] == "endpoints"
    (k_again, again), = [(k, v) for k, v in rows.items() if "endpoints@" in k]
    stored = res[next(k for k in res if k.endswith(f"|{gate}|endpoints|lr{k_again.split('@')[1]}"))]
    assert again["retuned_heldout_kl"] == pytest.approx(stored["heldout_kl"]["after"], rel=1e-4)
    assert all(v["windows"] > 1 for v in rows.values())  # every window, not the first one
    assert "Whole test set (all " in (tmp_path / "BENCH.md").read_text()
    # the same commands again compute nothing
    for name in ("tune_one", "measure", "cheap_choice", "timed_scores"):
        monkeypatch.setattr(compare_cells, name, lambda *a, **k: pytest.fail("recomputed a stored cell"))
    monkeypatch.setattr(compare_cells.ev, "text_metrics", lambda *a, **k: pytest.fail("recomputed a perplexity"))
    monkeypatch.setattr(compare_cells.importance, "sleb", lambda *a, **k: pytest.fail("recomputed SLEB"))
    monkeypatch.setattr(compare_cells.gate_cells, "gate_run", lambda *a, **k: pytest.fail("recomputed the gate"))
    monkeypatch.setattr(compare_cells.latency, "interleaved_latency", lambda *a, **k: pytest.fail("recomputed a latency"))
    bench_compare.main(full)
    bench_compare.main(argv)
    assert json.loads((tmp_path / "compare.json").read_text()) == res
    # --write-only measures nothing, so it keeps the section's measured-on line
    md = tmp_path / "BENCH.md"
    md.write_text(re.sub(r"_Measured \S+ on: ", "_Measured 2000-01-01 on: ", md.read_text()))
    bench_compare.main(argv + ["--write-only"])
    assert "_Measured 2000-01-01 on: " in md.read_text() and "--write-only" not in md.read_text()


def test_bad_method_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        bench_compare.parse_args(["--methods", "clp-gate,magic"])
    assert "unknown method or stage 'magic'" in capsys.readouterr().err


def test_v1_replay_equals_the_v1_read_off(monkeypatch):
    from benchmarks import gate_cells
    import search

    landscape = {s: abs(s - 7) + 1.0 for s in range(11)} | {1: 0.5, 2: 6.0}
    orc = {"ranked": [[[s, s + 1], v] for s, v in landscape.items()]}
    monkeypatch.setattr(search, "removed_kl", lambda model, teacher, layers: landscape[layers[0]])
    for mu in (2.0, 4.0, 9.5):
        gate = search.ContiguousGate(12, 2, mu=[mu])
        want = search.choose_block(None, None, {0: gate}, 12, radius=1)
        got = gate_cells.replay_v1([gate.read_off()], orc, 12, 2)
        assert got["removed_layers"] == want[0]["removed_layers"] and got["scored"] == len(want)


def test_two_runs_sharing_a_results_file_lose_no_cell(tmp_path):
    from benchmarks.common import load_cells, store_cell
    path = tmp_path / "cells.json"
    a, b = load_cells(path), load_cells(path)  # two runs start from the same (empty) file
    store_cell(path, a, "x", 1)
    store_cell(path, b, "y", 2)  # b never saw x
    store_cell(path, a, "z", 3)
    assert load_cells(path) == {"x": 1, "y": 2, "z": 3} and b == {"x": 1, "y": 2}


def test_a_run_over_fewer_ratios_reuses_the_wider_speed_measurement(tmp_path, monkeypatch):
    from argparse import Namespace
    from benchmarks.common import load_cells, store_cell
    path = tmp_path / "cells.json"
    wide = {"30": {"prefill": 1.0}, "24": {"prefill": 2.0}, "18": {"prefill": 3.0}}
    store_cell(path, {}, "fp|latency-interleaved512+32x5|30,24,18", wide)
    b = object.__new__(compare_cells.Bench)
    b.a, b.fp, b.L, b.readonly = Namespace(results=path, latency_seqlen=512, latency_runs=5), "fp", 30, False
    b.res, b.gates = load_cells(path), {}
    monkeypatch.setattr(compare_cells.latency, "interleaved_latency", lambda *a, **k: pytest.fail("re-timed"))
    assert compare_cells.speed(b, [24]) == wide  # depths 30 and 24 were timed together already
    b.a.latency_runs = 3  # other settings: a new measurement
    monkeypatch.setattr(compare_cells.latency, "interleaved_latency", lambda models, *a, **k: ({n: {} for n in models}, 0.0))
    b.model = SimpleNamespace(without=lambda removed: None)
    assert set(compare_cells.speed(b, [24])) == {"30", "24", "bandwidth", "load"}


def test_v4_continued_from_a_stored_v3_run_equals_a_v4_run(monkeypatch):
    """bench_gate stores v4 as v3's run continued by the width walk: the same choice and the same scored
    placements as search.choose_block with that round, from the same gate."""
    from types import SimpleNamespace
    from benchmarks import gate_cells
    import search

    target = {2, 3, 10, 11, 12, 13, 14, 15}
    monkeypatch.setattr(search, "removed_kl", lambda model, teacher, layers: 1 + 0.05 * len(set(layers) ^ target)
                        + 0.001 * min(layers))  # no ties
    model = SimpleNamespace(cfg=SimpleNamespace(num_layers=20))
    gate = search.ContiguousGate(20, 8, segments=2, mu=[4.0, 12.0])
    v3 = search.choose_block(model, None, {0: gate}, 20, radius=1, rounds=())
    live = search.choose_block(model, None, {0: gate}, 20, radius=1, rounds=gate_cells.rounds((("widths", 1),)))
    prior = {"candidates": [[c["removed_layers"], c["kl"]] for c in v3], "seconds": 10.0, "time_s": {"gate_steps": 1.0}}
    got = gate_cells.continue_run(model, None, prior, 2)
    assert got["removed_layers"] == live[0]["removed_layers"] == sorted(target) and got["kl"] == live[0]["kl"]
    assert sorted(c[0] for c in got["candidates"]) == sorted(c["removed_layers"] for c in live)
    live5 = search.choose_block(model, None, {0: gate}, 20, radius=1, rounds=((search.shifts, 1),))
    got5 = gate_cells.continue_run(model, None, prior, 2, (("anywhere", 1),))
    assert sorted(c[0] for c in got5["candidates"]) == sorted(c["removed_layers"] for c in live5)
    assert len(got5["candidates"]) > len(got["candidates"]) and got5["removed_layers"] == sorted(target)
    assert got["seconds"] >= 10.0 and "walk_widths1" in got["time_s"] and got["continued_from"] == "v3"


def test_v6_continues_the_stored_v5_run_and_equals_a_live_v6_run(monkeypatch):
    """v6's walks begin with v5's, so bench_gate stores v6 as the stored v5 run continued by the swap walk (and
    falls back to v3's with both walks): the same choice and scored placements as a live v6 search."""
    from types import SimpleNamespace
    from benchmarks import gate_cells
    import search

    path = {(13, 14, 17): 0.367, (13, 16, 17): 0.38, (16, 17, 18): 0.395}  # as in test_search: v5 stops at 16-18
    monkeypatch.setattr(search, "removed_kl", lambda model, teacher, layers: path.get(tuple(layers), 1 + 0.001 * abs(min(layers) - 16)))
    model = SimpleNamespace(cfg=SimpleNamespace(num_layers=30))
    gate = search.ContiguousGate(30, 3, segments=2, mu=[16.0, 18.5])
    target = {13, 14, 17}
    runs = {v: search.choose_block(model, None, {0: gate}, 30, radius=1, rounds=gate_cells.rounds(gate_cells.HISTORY[v][1]))
            for v in ("v3", "v5", "v6")}
    assert runs["v5"][0]["kl"] == 0.395 and runs["v6"][0]["removed_layers"] == sorted(target)
    stored = lambda v: {"candidates": [[c["removed_layers"], c["kl"]] for c in runs[v]], "seconds": 1.0, "time_s": {}}  # noqa: E731
    for have, want_prior, want_walks in ((("v3", "v5"), "v5", (("swaps", 1),)), (("v3",), "v3", (("anywhere", 1), ("swaps", 1))),
                                         ((), None, None)):
        res = {gate_cells.key("b", "gate", v): stored(v) for v in have}
        prior, walks = gate_cells.stored_prefix("v6", res, "b")
        assert (prior and prior["continued_from"]) == want_prior and walks == want_walks
        if prior:
            got = gate_cells.continue_run(model, None, prior, 2, walks)
            assert got["removed_layers"] == sorted(target) and got["continued_from"] == want_prior
            assert {tuple(c[0]) for c in got["candidates"]} == {tuple(c["removed_layers"]) for c in runs["v6"]}
    # v7 (a beam of two) continues the stored v6 run the same way
    runs["v7"] = search.choose_block(model, None, {0: gate}, 30, radius=1)  # search.py's RESHAPE
    prior, walks = gate_cells.stored_prefix("v7", {gate_cells.key("b", "gate", v): stored(v) for v in ("v3", "v5", "v6")}, "b")
    assert prior["continued_from"] == "v6" and walks == (("swaps", 2),)
    got = gate_cells.continue_run(model, None, prior, 2, walks)
    assert {tuple(c[0]) for c in got["candidates"]} == {tuple(c["removed_layers"]) for c in runs["v7"]}


def test_the_current_variant_is_what_search_runs():
    assert gate_cells.rounds(gate_cells.HISTORY[gate_cells.CURRENT][1]) == search.RESHAPE


def test_spearman_by_hand():
    from benchmarks.compare_report import ranks, spearman
    assert ranks([10, 20, 20, 30]) == [1, 2.5, 2.5, 4]
    # rank differences 0, 1, 1, 0: rho = 1 - 6 * 2 / (4 * (16 - 1)) = 0.8
    assert spearman([1, 2, 3, 4], [5, 7, 6, 9]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_repair_ranking_places_the_sets_by_their_repaired_figures():
    from argparse import Namespace
    from benchmarks.compare_report import repair_ranking

    def row(layers, calib, held, ppl):
        return {"choice": {"removed_layers": layers, "kl": calib},
                "tuned": {"endpoints": {"tune": {"heldout_kl": {"after": held}}, "ppl": ppl}}}
    res = {(0.2, "clp-gate"): row([2, 3], 0.5, 0.30, 40.0),   # best before, second after by held-out KL, third by ppl
           (0.2, "exhaustive"): row([2, 3], 0.5, 0.30, 40.0),  # the same set again counts once
           (0.2, "random-0"): row([0, 1], 3.0, 0.20, 30.0),
           (0.2, "tail"): row([6, 7], 9.0, 0.90, 35.0)}
    b = Namespace(a=Namespace(ratios=[0.2], ppl_windows=2))
    lines = repair_ranking(b, res)
    # calib (0.5, 3, 9) vs held (0.3, 0.2, 0.9): ranks (1,2,3) vs (2,1,3) -> rho 0.5; held vs ppl (40, 30, 35): (2,1,3) vs (3,1,2) -> 0.5
    assert lines[-2] == "| 20% | 3 | 0.50 | 0.50 | 2-3 | 2 / 3 | 2-3 | 2 / 3 |"
