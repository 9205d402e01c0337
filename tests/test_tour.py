"""docs/tour.md cannot rot: every command it shows runs (with small settings), and every output line it quotes
still has the form the code prints now. Exercise commands must name only flags their script accepts."""
import io
import re
import runpy
import shlex
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest

from conftest import DATA, ROOT, need

TOUR = ROOT / "docs" / "tour.md"
CONSOLE = re.compile(r"^```console\n(.*?)^```", re.S | re.M)
SHELL = re.compile(r"^ *```sh\n(.*?)^ *```", re.S | re.M)
# what makes a command fast enough for CI: the same code paths on fewer and shorter windows, fewer steps, and
# a search that removes 28 of the 30 layers, so that the checkpoints cut, tuned and quantized after it are small
SMALL = {
    "search.py": {"--nsamples": "2", "--seqlen": "32", "--steps": "3", "--prune-layers": "28"},
    "baselines.py": {"--nsamples": "2", "--seqlen": "32"},
    "tune.py": {"--steps": "2", "--nsamples": "2", "--val-samples": "1", "--seqlen": "32", "--batch-size": "1"},
    "quantize.py": {"--nsamples": "2", "--seqlen": "64"},
    "eval.py": {"--ppl-windows": "1", "--seqlen": "64", "--limit": "4"},
}


def complete(cmd):
    try:
        shlex.split(cmd)
        return True
    except ValueError:  # an open quote: the command goes on in the next line
        return False


def console_blocks():
    """[(command, quoted output lines)] of every ```console block, in the order of the tour."""
    out = []
    for m in CONSOLE.finditer(TOUR.read_text(encoding="utf-8")):
        lines = m[1].splitlines()
        assert lines[0].startswith("$ "), f"a console block must start with '$ ': {lines[0]!r}"
        cmd, i = lines[0][2:], 1
        while not complete(cmd):
            cmd, i = cmd + "\n" + lines[i], i + 1
        out.append((cmd, lines[i:]))
    return out


def shell_commands():
    """Every command line of the ```sh blocks (the exercises)."""
    return [line.strip() for m in SHELL.finditer(TOUR.read_text(encoding="utf-8"))
            for line in m[1].splitlines() if line.strip().startswith("python ")]


def small(argv):
    """argv with the fast settings of its script put in (replacing the tour's values)."""
    argv = list(argv)
    for flag, value in SMALL.get(argv[0], {}).items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def shape(line):
    """What stays the same when a command runs with other settings: numbers (and lists of them), mask strips
    and which start goes on are blanked, whitespace runs count as one space."""
    line = re.sub(r"\|[ .:=+*#%@-]*\|", "|MASK|", line)
    line = re.sub(r"\(read off by start\(s\) \[[\d, ]*\]\)|\(neighbour\)|\(visited\)", "(ROLE)", line)
    line = re.sub(r"\b(stops|goes on)\b", "HALT", line)
    line = re.sub(r"\d+(?:[.,]\d+)*(?:e[-+]?\d+)?", "N", line)
    line = re.sub(r"\[N(?:, N)*\]", "[N...]", line)
    return " ".join(line.split())


def run(cmd, monkeypatch):
    """Run a `python ...` command line in this process (the imports are shared, so it is fast); its output."""
    argv = shlex.split(cmd)
    assert argv[0] == "python", cmd
    buf = io.StringIO()
    with redirect_stdout(buf), redirect_stderr(buf):
        try:
            if argv[1] == "-c":
                exec(compile(argv[2], "<tour>", "exec"), {"__name__": "__main__"})
            else:
                argv = small(argv[1:])
                monkeypatch.setattr(sys, "argv", argv)
                runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
        except SystemExit as e:
            assert e.code in (None, 0), f"{cmd} exited with {e.code}:\n{buf.getvalue()[-2000:]}"
    return buf.getvalue()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tour")


def test_the_tour_has_its_stops():
    text = TOUR.read_text(encoding="utf-8")
    order = [text.index(f"[`{name}.py`]") for name in
             ("load_weights", "model", "gates", "search", "excise", "tune", "quantize", "eval")]
    assert order == sorted(order), "the stops follow the data flow"
    assert len(console_blocks()) >= 8 and len(shell_commands()) >= 6


@pytest.mark.parametrize("n", range(len(console_blocks())))
def test_tour_command(n, workdir, monkeypatch):
    need(DATA / "wikitext-2-raw" / "wiki.valid.raw")
    monkeypatch.setenv("CLP_DATA", str(DATA))  # the quoted lines name $CLP_DATA
    monkeypatch.chdir(workdir)  # runs/tour/... of the commands lands in a temporary directory
    cmd, quoted = console_blocks()[n]
    if "plots.py" in cmd:
        pytest.importorskip("matplotlib")  # an optional extra (requirements-plots.txt)
    printed = {shape(line) for line in run(cmd, monkeypatch).splitlines()}
    missing = [line for line in quoted if line.strip() not in ("", "...") and shape(line) not in printed]
    assert not missing, f"$ {cmd}\nquoted in the tour but no longer printed in this form:\n" + "\n".join(missing)


def test_exercise_commands_use_real_flags(monkeypatch):
    helps = {}
    for cmd in shell_commands():
        argv = shlex.split(cmd.split(" #")[0])
        script = argv[1]
        if script not in helps:
            assert (ROOT / script).is_file(), cmd
            helps[script] = run(f"python {script} --help", monkeypatch)
        for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
            assert flag in helps[script], f"{cmd}: {script} has no {flag}"


def test_shape_blanks_only_what_varies():
    assert shape("step   1/30  tau 2.000  4 start(s)") == shape("step 3/3 tau 0.050 1 start(s)")
    assert shape("  start 2  kl 0.7322  block   12.6-18.6  |   =@@@+  |") == shape("start 0 kl 1.5 block 1.0-7.0 |@@  |")
    assert shape("removed layers [13, 14, 15] of 30") == shape("removed layers [0] of 6")
    assert shape("chosen block: layers 13-18") != shape("chosen layers: 13-18")
