"""The importable functions behind the CLIs run what the CLIs run: where a function's keyword mirrors a flag
(same name as the flag's dest), its default is the flag's default. Calling search.search(...) with no
settings must not run an older search than `python search.py` does."""
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
ENTRIES = [(search, [search.run, search.search]), (baselines, [baselines.run]), (tune, [tune.tune]),
           (quantize, [quantize.quantize_checkpoint]), (excise, [excise.excise]), (ev, [ev.run])]
# flags whose parsed value main() turns into the keyword's: {(module, dest): (keyword, how main converts)}
CONVERTED = {("search", "excise"): ("excise_to", lambda v: v),
             ("search", "resize"): ("resize", lambda v: None if v == "none" else v),
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
    assert "search.resize" in ids and "search.kl_chunk" in ids and "tune.train_layers" in ids
