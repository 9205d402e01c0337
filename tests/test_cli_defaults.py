"""The importable functions behind the CLIs run what the CLIs run: where a function's keyword mirrors a flag
(same name as the flag's dest), its default is the flag's default. Calling search.search(...) with no
settings must not run another search than `python search.py` does."""
import argparse
import inspect
from pathlib import Path

import pytest

import baselines
import eval as ev
import excise
import quantize
import search
import tune

# (CLI module, the functions its main hands the parsed flags to; earlier ones take precedence)
ENTRIES = [(search, [search.run, search.search]), (baselines, [baselines.run]), (tune, [tune.run]),
           (quantize, [quantize.run]), (excise, [excise.run]), (ev, [ev.run])]
# flags whose parsed value main() turns into the keyword's: {(module, dest): (keyword, how main converts)}
CONVERTED = {("search", "excise"): ("excise_to", lambda v: v),
             ("eval", "tasks"): ("tasks", lambda v: []),  # parse_args: None (no --tasks) -> no tasks
             }
# where the CLI's default differs from the function's on purpose
DIFFERENT = {("eval", "threads"): "the CLI records the thread count it fixes; the function leaves torch's as it is"}


def norm(v):
    if isinstance(v, (list, tuple)):
        return [norm(x) for x in v]
    return str(v) if isinstance(v, Path) else v


def pairs():
    for module, functions in ENTRIES:
        name = module.__name__
        params = {}
        for fn in reversed(functions):
            params |= {k: p.default for k, p in inspect.signature(fn).parameters.items()
                       if p.default is not inspect.Parameter.empty}
        for action in module.build_parser()._actions:
            if action.default == "==SUPPRESS==" or action.dest == "help":
                continue
            keyword, convert = CONVERTED.get((name, action.dest), (action.dest, lambda v: v))
            if keyword in params and (name, action.dest) not in DIFFERENT:
                yield pytest.param(convert(action.default), params[keyword], id=f"{name}.{keyword}")


@pytest.mark.parametrize("cli_default, function_default", list(pairs()))
def test_function_default_is_the_cli_default(cli_default, function_default):
    assert norm(function_default) == norm(cli_default)


def test_every_cli_mirrors_some_keywords():
    """The comparison above is not vacuous: each entry point shares most of its flags with its functions."""
    ids = [p.id for p in pairs()]
    for module, _ in ENTRIES:
        assert sum(i.startswith(module.__name__ + ".") for i in ids) >= 2, module.__name__
    assert "search.segments" in ids and "search.kl_chunk" in ids and "tune.train_layers" in ids


@pytest.mark.parametrize("module, argv, dest, value", [
    (search, ["--chunk", "64"], "kl_chunk", 64),
    (tune, ["--ckpt", "c", "--out", "o", "--chunk", "64"], "kl_chunk", 64),
    (tune, ["--ckpt", "c", "--out", "o", "--layers", "3,4"], "train_layers", "3,4"),
    (excise, ["--out", "o", "--report", "r.json"], "search_report", Path("r.json")),
    (quantize, ["--out", "o", "--report", "q.json"], "json_out", Path("q.json")),
    (quantize, ["--out", "o", "--compute-dtype", "bfloat16"], "dtype", "bfloat16"),
    (__import__("plots"), ["--report", "r.json"], "search_report", "r.json"),
])
def test_old_spellings_still_parse_but_are_not_shown(module, argv, dest, value):
    p = module.build_parser()
    assert getattr(p.parse_args(argv), dest) == value
    old = next(a for a in argv if a.startswith("--") and a not in ("--ckpt", "--out"))
    shown = {s for a in p._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
    assert old not in shown and f"[{old} " not in p.format_usage()


def test_quantize_dtype_is_the_compute_dtype():
    a = quantize.build_parser().parse_args(["--out", "o", "--dtype", "bfloat16"])
    assert (a.dtype, a.save_dtype) == ("bfloat16", "float16")
