"""The Markdown a reader gets with a clone: no paths of the machine it was written on, no dead relative links,
no command-line flag the tool does not have, no file that is not in the repository."""
import argparse
import ast
import functools
import importlib
import re
import subprocess
import sys

import pytest

from conftest import ROOT

ABSOLUTE = re.compile(r"(?<![\w.$~/-])/(work|root|home|tmp)/")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^[ \t]*```.*?^[ \t]*```", re.S | re.M)  # fenced code, also indented in a list item


def markdown_files():
    """Committed Markdown, and new files not ignored (they are about to be committed)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        files = [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        files = [p for p in ROOT.rglob("*.md") if not {".venv", "runs"} & set(p.relative_to(ROOT).parts)]
    assert any(p.name == "README.md" for p in files)
    return files


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path):
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(m[1]) for m in re.finditer(r"^#+\s+(.+)$", text, re.M)}


def test_no_absolute_machine_paths():
    bad = [f"{p.relative_to(ROOT)}:{n}: {line.strip()[:100]}" for p in markdown_files()
           for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if ABSOLUTE.search(line)]
    assert not bad, "absolute paths of a machine in Markdown:\n" + "\n".join(bad)


def test_every_relative_link_resolves():
    bad = []
    for p in markdown_files():
        for target in LINK.findall(FENCE.sub("", p.read_text(encoding="utf-8"))):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (p.parent / path).resolve() if path else p
            if not dest.exists():
                bad.append(f"{p.relative_to(ROOT)}: {target} (no such file)")
            elif not dest.resolve().is_relative_to(ROOT):
                bad.append(f"{p.relative_to(ROOT)}: {target} (outside the repository)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{p.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, "dead links:\n" + "\n".join(bad)


@pytest.mark.parametrize("heading, want", [
    ("report.json (search.py, baselines.py)", "reportjson-searchpy-baselinespy"),
    ("GPTQ on-disk format", "gptq-on-disk-format"),
    ("eval.py `--json OUT`", "evalpy---json-out"),
    ("4. The search: [`search.py`](../search.py) and [`teacher.py`](../teacher.py)", "4-the-search-searchpy-and-teacherpy"),
])
def test_slug(heading, want):
    assert slug(heading) == want


def test_the_checks_can_fail(tmp_path):
    assert ABSOLUTE.search("see /work/shared/DESIGN.md") and ABSOLUTE.search("`/root/.cache/clp`")
    assert not ABSOLUTE.search("runs/tmp/x and https://host/home/page and $CLP_DATA/wikitext-2-raw")
    assert LINK.findall("a [x](docs/a.md#b) and ![p](img/p.png)") == ["docs/a.md#b", "img/p.png"]


# ---------------------------------------------------------------- the commands in the docs run as written

# every command-line tool: the script as the docs spell it -> its module (each has build_parser())
CLIS = {f"{name}.py": name for name in ("search", "baselines", "excise", "tune", "quantize", "eval", "plots",
                                        "load_weights", "data")}
CLIS |= {f"benchmarks/{name}.py": f"benchmarks.{name}" for name in (
    "bench_compare", "bench_eval", "bench_gate", "bench_quantize", "bench_search", "bench_speed", "bench_tune",
    "gpu_check", "plan_table")}
SCRIPT = re.compile(r"(?<![\w/.-])((?:benchmarks/)?\w+\.py)\b")
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
INLINE = re.compile(r"`([^`\n]+)`")
SEPARATOR = re.compile(r"\s(?:&&|\|\||;|\|)\s")  # between two commands on one line


@functools.lru_cache(maxsize=None)
def parser_flags(module):
    """{option string: shown in --help} of every flag the CLI's parser accepts. A hidden one
    (help=argparse.SUPPRESS) is an old spelling kept for users' scripts: the docs use the new one."""
    if str(ROOT / "benchmarks") not in sys.path:  # some benchmarks import their neighbours as top-level modules
        sys.path.append(str(ROOT / "benchmarks"))
    actions = importlib.import_module(module).build_parser()._option_string_actions
    return {flag: action.help != argparse.SUPPRESS for flag, action in actions.items()}


def commands(line):
    """(script, flags) of each command on one line: flags belong to the script they follow, up to the next
    script, a shell separator, a redirection or a comment."""
    out = []
    for part in SEPARATOR.split(f" {line} "):
        part = re.split(r"\s(?:#|>|2>)\s", part)[0]
        hits = list(SCRIPT.finditer(part))
        for m, nxt in zip(hits, hits[1:] + [None]):
            out.append((m[1], FLAG.findall(part[m.end(): nxt.start() if nxt else len(part)])))
    return out


def logical_lines(text):
    """(number of the first line, line) with shell continuations (a trailing backslash) joined."""
    out, start, pending = [], None, ""
    for n, line in enumerate(text.splitlines(), 1):
        start = start or n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        start, pending = None, ""
    return out


def doc_commands(text, makefile=False):
    """(line number, script, flags) of every command in a Markdown text (code blocks, inline code, and a table
    row whose cells name one script and give its arguments), or in a Makefile's recipes."""
    if makefile:
        return [(n, s, f) for n, line in logical_lines(text) if not line.lstrip().startswith("#")
                for s, f in commands(line.replace("$(PY)", "python"))]
    found = []
    for fence in FENCE.finditer(text):
        first = text.count("\n", 0, fence.start())
        found += [(first + n, s, f) for n, line in logical_lines(fence[0]) for s, f in commands(line)]
    prose = FENCE.sub(lambda m: "\n" * m[0].count("\n"), text)
    for n, line in enumerate(prose.splitlines(), 1):
        spans = INLINE.findall(line)
        found += [(n, s, f) for span in spans for s, f in commands(span) if f]
        row = re.match(r"\|\s*`((?:benchmarks/)?\w+\.py)`\s*\|", line)
        if row:  # a table row whose first cell is `X.py`: the cells that start with -- are its arguments
            args = [f for span in spans if span.lstrip().startswith("--") for f in FLAG.findall(span)]
            found += [(n, row[1], args)] if args else []
    return found


def unknown_flags(text, makefile=False, name="text"):
    """'name:line: python X.py --flag' for each flag a command gives that X.py's parser does not have, or has
    only as a hidden old spelling."""
    bad = []
    for n, script, flags in doc_commands(text, makefile):
        known = parser_flags(CLIS[script]) if script in CLIS else None
        for flag in flags if known is not None else ():
            if not known.get(flag):
                bad.append(f"{name}:{n}: python {script} {flag}" + (" (an old spelling)" if flag in known else ""))
    return bad


def docstring(path):
    """A module's docstring: the CLIs show their commands there."""
    return ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""


def documents():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_flag_in_the_docs_exists():
    bad = []
    for p in documents():
        bad += unknown_flags(p.read_text(encoding="utf-8"), name=str(p.relative_to(ROOT)))
    bad += unknown_flags((ROOT / "Makefile").read_text(), makefile=True, name="Makefile")
    for script in CLIS:  # the usage lines of each CLI's docstring (indented), read as a code block
        usage = [line if line.startswith("    ") else "" for line in docstring(ROOT / script).splitlines()]
        bad += unknown_flags("\n".join(["```", *usage, "```"]), name=f"{script} docstring")
    assert not bad, "flags that the CLI does not have:\n" + "\n".join(bad)


def test_a_planted_unknown_flag_is_caught():
    text = ("Run\n\n```\npython search.py --ckpt x --prune-ratio 0.2 --no-such-flag 3 && \\\n"
            "  python benchmarks/bench_gate.py --budgets 3 --planted-too\n```\n\n"
            "or `python tune.py --ckpt d --bogus-flag` inline, in a table:\n\n"
            "| `excise.py` | bad | `--ckpt {ckpt} --nonexistent 2` |\n| `--offload` (not `tune.py`) | x |\n")
    assert unknown_flags(text) == ["text:4: python search.py --no-such-flag",
                                   "text:4: python benchmarks/bench_gate.py --planted-too",
                                   "text:8: python tune.py --bogus-flag", "text:10: python excise.py --nonexistent"]
    assert unknown_flags("\t$(PY) eval.py --ckpt x --ppl wikitext2 --not-eval\n", makefile=True) == \
        ["text:1: python eval.py --not-eval"]
    # flags after a comment, another tool's, or a flag of a tool that has it are not reported
    assert not unknown_flags("```\npython excise.py --ckpt a --out b  # then --whatever\n"
                             "python -m pytest -q tests/test_docs.py --lf\n```\n")


def test_every_named_file_exists():
    """A script or document the docs name (`search.py`, benchmarks/bench_gate.py, docs/usage.md) is in the
    repository: beside the document, at the root, or (a bare name) under benchmarks/ or tests/."""
    name = re.compile(r"(?<![\w/.:-])((?:\.\./|[\w-]+/)*[\w-]+\.(?:py|md))\b")
    bad = []
    for p in [*documents(), ROOT / "Makefile"]:
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            for target in name.findall(LINK.sub("", line)):  # a link's target is test_every_relative_link_resolves's
                where = [p.parent / target, ROOT / target] + ([ROOT / d / target for d in ("benchmarks", "tests")]
                                                               if "/" not in target else [])
                if not any(w.is_file() for w in where):
                    bad.append(f"{p.relative_to(ROOT)}:{n}: {target}")
    assert not bad, "files named in the docs that are not in the repository:\n" + "\n".join(bad)


def test_the_demo_search_passes_every_check_made_before_loading(tmp_path, monkeypatch):
    """make demo's search line (its --out and --excise, its budget, its flags) gets as far as loading the model:
    a check added later that refuses it must fail here, not in a user's first `make demo`."""
    import shlex

    import search
    from machinery import placement

    line = next(ln for ln in (ROOT / "Makefile").read_text().splitlines() if " search.py " in ln)
    argv = shlex.split(line.split(" search.py ", 1)[1])

    class Reached(Exception):
        pass

    def load(*args, **kwargs):
        raise Reached
    monkeypatch.setattr(placement, "load_placed", load)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Reached):
        search.run(**search_kwargs(search, argv))


def search_kwargs(search, argv):
    """search.run's keywords for a command line, as search.main hands them over."""
    kwargs = vars(search.build_parser().parse_args(argv))
    for key in ("dry_run", "device_memory", "plot"):
        kwargs.pop(key)
    kwargs["excise_to"] = kwargs.pop("excise")
    return kwargs
