"""Resume: an interrupted gate search, GPTQ run or exhaustive scoring continues to the uninterrupted result."""
import contextlib
import json
import io

import pytest
import torch

import baselines
import load_weights
import quantize
import search
from conftest import FIXTURES
from machinery import resume
from teacher import build_teacher
from test_quantize import RAW, tiny_model


class Interrupt(Exception):
    pass


def interrupt_after(monkeypatch, module, name, calls):
    """Make module.name raise after `calls` calls: the run dies there, as if killed."""
    orig, count = getattr(module, name), [0]

    def dying(*a, **k):
        count[0] += 1
        if count[0] > calls:
            raise Interrupt
        return orig(*a, **k)
    monkeypatch.setattr(module, name, dying)
    return lambda: monkeypatch.setattr(module, name, orig)


def quiet(fn, *a, **k):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*a, **k)


def tiny_search(state=resume.OFF):
    model, _ = load_weights.load(FIXTURES / "tiny-llama3")
    tokens = torch.randint(0, model.cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    teacher = build_teacher(model, tokens)
    return quiet(search.search, model, teacher, 2, starts=4, steps=9, seed=0, state=state)


# killed in the first third, in the last step (after both halvings), in the read-off
@pytest.mark.parametrize("where, calls", [("gate_loss", 9), ("gate_loss", 20), ("removed_kl", 1)])
def test_interrupted_search_resumes_to_the_same_result(tmp_path, monkeypatch, where, calls):
    want = tiny_search()
    path = tmp_path / "search_state.safetensors"
    restore = interrupt_after(monkeypatch, search, where, calls)
    with pytest.raises(Interrupt):
        tiny_search(resume.GateState(path, 2, {"k": 2}))
    restore()
    assert path.is_file()
    got = tiny_search(resume.GateState(path, 2, {"k": 2}, resume=True))
    for key in ("removed_layers", "kl", "candidates", "trajectory", "final_mu", "survivors"):
        assert got[key] == want[key], key
    with pytest.raises(ValueError, match="k=2"):
        resume.GateState(path, 2, {"k": 3}, resume=True)


def test_resume_without_a_state_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved search state"):
        resume.GateState(tmp_path / "search_state.safetensors", 2, {}, resume=True)


def gptq_run(work=resume.OFF):
    model = tiny_model()
    tokens = torch.randint(0, RAW["vocab_size"], (4, 64), generator=torch.Generator().manual_seed(1))
    settings = dict(method="gptq", bits=4, group_size=32, sym=False, act_order=False, blocksize=128, percdamp=0.01)
    results, rows = quiet(quantize.quantize_model, model, tokens, settings, work=work)
    return model, results, rows


def test_resumed_gptq_gives_identical_tensors(tmp_path, monkeypatch):
    model, results, rows = gptq_run()
    work = tmp_path / "q.partial"
    restore = interrupt_after(monkeypatch, quantize, "quantize_block", 1)  # dies in the second layer
    with pytest.raises(Interrupt):
        gptq_run(resume.LayerStore(work, {"bits": 4}))
    restore()
    assert resume.LayerStore(work, {"bits": 4}).done() == [0]
    model2, results2, rows2 = gptq_run(resume.LayerStore(work, {"bits": 4}))
    assert results2.keys() == results.keys()
    for name, res in results.items():
        for k in ("codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(res, k), getattr(results2[name], k)), (name, k)
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    assert [r["proxy_error"] for r in rows] == [r["proxy_error"] for r in rows2]
    with pytest.raises(ValueError, match="bits=4"):
        resume.LayerStore(work, {"bits": 3})


def test_exhaustive_keeps_finished_scores(tmp_path, monkeypatch):
    model, _ = load_weights.load(FIXTURES / "tiny-llama3")
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    teacher = build_teacher(model, tokens)
    want = quiet(baselines.exhaustive, model, teacher, 2)
    path = tmp_path / "scores.json"
    restore = interrupt_after(monkeypatch, baselines, "removed_kl", 3)
    with pytest.raises(Interrupt):
        quiet(baselines.exhaustive, model, teacher, 2, done=resume.Scores(path, {"k": 2}))
    restore()
    calls = []
    real = baselines.removed_kl
    monkeypatch.setattr(baselines, "removed_kl", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = quiet(baselines.exhaustive, model, teacher, 2, done=resume.Scores(path, {"k": 2}))
    assert got == want and len(calls) == 5 - 3  # 5 blocks of 2 in 6 layers, 3 kept from the first run


def test_quantize_cli_leaves_no_checkpoint_until_done_and_resumes(tmp_path, monkeypatch):
    """quantize.py killed in its second layer: no OUT, OUT.partial holds layer 0; the same command finishes it
    with the tensors of an uninterrupted run and removes OUT.partial."""
    from safetensors.torch import load_file

    from badinputs import packable

    ckpt = packable(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("calibration text for a tiny model, long enough for a few windows. " * 60)

    def cli(out):
        quiet(quantize.main, ["--ckpt", str(ckpt), "--out", str(out), "--nsamples", "4", "--seqlen", "32",
                              "--group-size", "32", "--calib", str(text), "--device", "cpu"])

    cli(tmp_path / "want")
    out = tmp_path / "q"
    restore = interrupt_after(monkeypatch, quantize, "quantize_block", 1)
    with pytest.raises(Interrupt):
        cli(out)
    restore()
    work = resume.gptq_work_dir(out)
    assert not out.exists() and sorted(f.name for f in work.glob("layer-*")) == ["layer-00000.safetensors"]
    cli(out)
    assert not work.exists()
    want, got = load_file(tmp_path / "want" / "model.safetensors"), load_file(out / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_two_segment_oracle_keeps_finished_placements(tmp_path, monkeypatch):
    """bench_gate's S = 2 oracle killed after 4 placements: the rerun scores only the others, and ranks exactly
    as an uninterrupted run; its time adds the scoring time of both runs."""
    from benchmarks import gate_cells
    model, _ = load_weights.load(FIXTURES / "tiny-llama3")
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    teacher = build_teacher(model, tokens)
    want = quiet(gate_cells.oracle, model, teacher, 2, 2)["ranked"]
    n = len(want)  # 1 + 1 * C(L - 2 + 1, 2) placements of two 1-layer blocks (touching ones are one block)
    assert n == len(baselines.placements(model.cfg.num_layers, [1, 1])) > 4
    interrupt_after(monkeypatch, baselines, "token_kl", 4)  # one token_kl call per placement on this tiny teacher
    with pytest.raises(Interrupt):
        quiet(gate_cells.oracle_cell, model, teacher, 2, 2, "fp|x|0|2|2", tmp_path)
    saved = json.loads(gate_cells.oracle_partial("fp|x|0|2|2", tmp_path).read_text())
    assert len(saved["scores"]) == 4 and saved["seconds"] > 0
    monkeypatch.undo()
    scored = []
    real = baselines.score_placements
    monkeypatch.setattr(baselines, "score_placements", lambda m, t, sets, **k: scored.extend(sets) or real(m, t, sets, **k))
    got = quiet(gate_cells.oracle_cell, model, teacher, 2, 2, "fp|x|0|2|2", tmp_path)
    assert got["ranked"] == want and len(scored) == n - 4 and got["reused"] == 4
    assert got["seconds"] > saved["seconds"]
    with pytest.raises(ValueError, match="cell"):  # the same file under another cell's settings is refused
        resume.Scores(gate_cells.oracle_partial("fp|x|0|2|2", tmp_path), {"cell": "fp|x|0|3|2|oracle"})
