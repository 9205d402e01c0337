"""The import graph of the project's modules (function-local imports included): no cycle, no module imports a
CLI, and the machinery imports nothing above it."""
import ast

from conftest import ROOT

CLIS = {"search", "baselines", "tune", "quantize", "eval", "excise"}
# what the machinery may build on besides itself: the model and its files (what it places, plans and writes)
BELOW_MACHINERY = {"model", "gates", "gptq_format", "quant_paths", "tokenizer", "load_weights", "save_weights"}


def modules():
    """{module name: path} of the top-level modules and machinery/ (not tests or benchmarks)."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    found |= {f"machinery.{p.stem}": p for p in (ROOT / "machinery").glob("*.py") if p.stem != "__init__"}
    return found


def imports_of(path, known):
    """The project modules a file imports anywhere in it (top level or inside a function)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def graph():
    known = modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def cycle(g):
    """One import cycle of graph g as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(g.get(v, ())):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = "done"
        stack.pop()
        return None

    for v in sorted(g):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_the_graph_sees_function_local_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef g():\n    import search\n    from machinery import atomic\n")
    assert imports_of(f, {"search", "machinery.atomic", "tune"}) == {"search", "machinery.atomic"}


def test_no_import_cycle():
    g = graph()
    assert len(g) > 30 and g["search"] >= {"gates", "teacher", "machinery.plan"}
    assert cycle(g) is None, " -> ".join(cycle(g))


def test_no_module_imports_a_cli():
    bad = {(m, c) for m, deps in graph().items() for c in deps & CLIS}
    assert not bad, f"(importer, CLI): {sorted(bad)}"


def test_the_machinery_imports_nothing_above_it():
    g = graph()
    machinery = {m for m in g if m.startswith("machinery.")}
    bad = {(m, d) for m in machinery for d in g[m] - machinery - BELOW_MACHINERY}
    assert len(machinery) == 10 and not bad, f"(machinery module, what it imports): {sorted(bad)}"
