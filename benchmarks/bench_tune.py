"""Cutoff endpoint tuning against no tuning, tuning other layers and LoRA, at the same step budget.

    python benchmarks/bench_tune.py --prune-layers 12-20

Cuts --prune-layers out of --ckpt (excise.py), then runs tune.py once per variant with the same steps,
batch, calibration windows and seed, and measures every result with eval.py's functions: WikiText-2
test perplexity and KL to the dense model on the first --windows windows of 2048 tokens, and zero-shot
accuracy on the first --limit items of --tasks. Writes the "tune" section of BENCHMARKS.md. Finished
rows are cached in --work/results.json, so an interrupted run resumes; --fresh recomputes everything.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import PPL, command, heavy, load_cells, store_cell, update_section  # noqa: E402

import excise  # noqa: E402
import load_weights  # noqa: E402
import tune  # noqa: E402
from data import find_data_dir  # noqa: E402
from eval import text_metrics  # noqa: E402
from zeroshot import run_task  # noqa: E402

# (label, --train-layers, --method); every variant gets the same steps, data and seed
VARIANTS = [
    ("endpoints (CLP)", "endpoints", "full"),
    ("two layers below the cut", "below", "full"),
    ("last two layers", "last", "full"),
    ("LoRA r8, all layers", "all", "lora"),
]


def layer_spec(spec, pruning):
    """Resolve the bench's 'below' / 'last' into pruned-model indices; pass the rest to tune.py as is."""
    n = pruning["num_layers"]
    s = tune.endpoints(pruning["kept_layers"], pruning["source_num_layers"])[0]
    return {"below": f"{s - 2},{s - 1}", "last": f"{n - 2},{n - 1}"}.get(spec, spec)


def measure(ckpt, dense, ppl, a):
    model, tok = load_weights.load(ckpt)
    row = text_metrics(model, ppl.windows, teacher=dense, label="ppl+kl")
    row = {"ppl": row["ppl"], "kl": row.get("kl")}
    for task in a.tasks.split(",") if a.tasks else []:
        row[task] = run_task(model, tok, task, find_data_dir(a.data_dir), limit=a.limit)["acc"]
    return row


def build_parser():
    """The command line, built without running anything (tests/test_docs.py reads its flags)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=load_weights.DEFAULT, help="dense checkpoint")
    p.add_argument("--prune-layers", default="12-20", help="block to cut (source indices); 12-20 is the 30%% optimum of smollm2-135m")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps of every run")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="peak learning rates tried for every variant; the lowest held-out KL is kept")
    p.add_argument("--batch-size", type=int, default=4, help="windows per step")
    p.add_argument("--nsamples", type=int, default=64, help="training windows of 256 tokens (WikiText-2 valid)")
    p.add_argument("--windows", type=int, default=16, help="WikiText-2 test windows of 2048 tokens for perplexity and KL")
    p.add_argument("--tasks", default="piqa,arc_easy", help="zero-shot tasks (comma-separated; empty for none)")
    p.add_argument("--limit", type=int, default=200, help="items per task")
    p.add_argument("--data-dir", type=Path, default=None, help="data directory; None: $CLP_DATA, then ./data")
    p.add_argument("--work", type=Path, default=Path("runs/bench_tune"), help="checkpoints and results.json")
    p.add_argument("--lock", default=None, help="a lock file to hold during each heavy step (shared machines)")
    p.add_argument("--fresh", action="store_true", help="ignore cached rows")
    p.add_argument("--write-only", action="store_true", help="run nothing: write the section from the cached rows (missing rows say 'not run')")
    return p


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    cache = a.work / "results.json"
    if a.fresh:
        cache.unlink(missing_ok=True)
    rows = load_cells(cache)
    pruned = a.work / f"pruned-{a.prune_layers}"
    if not (pruned / "config.json").is_file():
        with heavy(a.lock):
            excise.run(a.ckpt, pruned, layers=a.prune_layers)
    pruning = tune.read_pruning(pruned)
    dense, tok = load_weights.load(a.ckpt)
    ppl = PPL(tok, a.windows, 2048, a.data_dir)
    jobs = [("dense", None, None), ("pruned, not tuned", None, None)] + \
           [(label, layer_spec(spec, pruning), method) for label, spec, method in VARIANTS]
    for label, spec, method in jobs:
        if a.write_only:
            continue
        if spec is not None:
            for lr in a.lrs.split(","):
                key = f"{label} @ {lr}"
                if key not in rows:
                    with heavy(a.lock):
                        store_cell(cache, rows, key, tune_run(pruned, spec, method, float(lr), a))
        if label in rows:
            continue
        print(f"== {label}", flush=True)
        ckpt = a.ckpt if label == "dense" else pruned
        row = {}
        if spec is not None:
            row = min((rows[f"{label} @ {lr}"] for lr in a.lrs.split(",")), key=lambda r: r["heldout_kl"]["after"])
            ckpt = row["out"]
        with heavy(a.lock):
            row = dict(row, **measure(ckpt, None if label == "dense" else dense, ppl, a))
        store_cell(cache, rows, label, row)
    write_section(rows, jobs, a, pruning, ppl)


def tune_run(pruned, spec, method, lr, a):
    """One tune.py run; its checkpoint stays in --work for the one that wins the held-out KL."""
    out = a.work / f"tuned-{spec.replace(',', '_')}-{method}-lr{lr:g}"
    rep = tune.run(pruned, out, train_layers=spec, method=method, steps=a.steps, lr=lr, batch_size=a.batch_size,
                    nsamples=a.nsamples, log_every=25)
    return {"tuned_layers": rep["tuned_layers"], "source_layers": rep["tuned_source_layers"], "out": str(out),
            "trainable": rep["trainable_parameters"], "lr": lr, "heldout_kl": rep["heldout_kl"],
            "seconds": rep["wall_time_s"]["tuning"],
            "command": f"python tune.py --ckpt {pruned} --train-layers {spec} --method {method} --steps {a.steps} "
                       f"--lr {lr:g} --batch-size {a.batch_size} --nsamples {a.nsamples} --out {out}"}


def layers_text(x):
    """'[11, 12] ([11, 21])', or 'all 21' when every layer was tuned."""
    if len(x["tuned_layers"]) > 4:
        return f"all {len(x['tuned_layers'])}"
    return f"{x['tuned_layers']} ({x['source_layers']})"


def write_section(rows, jobs, a, pruning, ppl):
    tasks = a.tasks.split(",") if a.tasks else []
    lrs = a.lrs.split(",")
    r = pruning["removed_layers"]
    lines = ["## Cutoff endpoint tuning (tune.py) against other layers and LoRA", "",
             f"Command: `{command()}`", "",
             f"Model: {a.ckpt} with layers {r[0]}-{r[-1]} of {pruning['source_num_layers']} cut out "
             f"(`python excise.py --ckpt {a.ckpt} --layers {a.prune_layers}`). Every run: {a.steps} AdamW steps of "
             f"{a.batch_size} windows x 256 tokens drawn from {a.nsamples} windows of the first 90% of the WikiText-2 "
             f"*validation* text, seed 0, loss KL(teacher || student) to the dense model, 5 warm-up steps then cosine "
             f"decay, gradient norm clipped at 1; LoRA: rank 8, alpha 16, on the 7 Linears, merged afterwards. Each "
             f"variant ran at every peak lr in {{{', '.join(lrs)}}}; the row is the run with the lowest *held-out KL* "
             f"(8 windows from the last 10% of the validation text; the test text plays no part in the choice). "
             f"*Test ppl / KL*: WikiText-2 test, first {a.windows} of {ppl.total} windows of 2048 tokens (a subset). "
             f"Zero-shot: `acc` on the first {a.limit} items. Tuned layers: the pruned model's indices, the source's in brackets.", "",
             "| variant | tuned layers | trainable params | held-out KL by lr | lr | tune s | held-out KL before -> after "
             "| test ppl | test KL | " + " | ".join(tasks) + " |",
             "|---|---|---:|---|---:|---:|---|---:|---:|" + "---:|" * len(tasks)]
    for label, spec, _ in jobs:
        if label not in rows:
            lines.append(f"| {label} | not run |" + " |" * (7 + len(tasks)))
            continue
        x, cells = rows[label], [label] + ["-"] * 6
        if spec is not None:
            hk = x["heldout_kl"]
            cells[1:] = [layers_text(x), f"{x['trainable']:,}",
                         " / ".join(f"{rows[f'{label} @ {lr}']['heldout_kl']['after']:.3f}" for lr in lrs),
                         f"{x['lr']:g}", f"{x['seconds']:.0f}", f"{hk['before']:.4f} -> {hk['after']:.4f}"]
        cells += [f"{x['ppl']:.3f}", "-" if x.get("kl") is None else f"{x['kl']:.4f}"]
        cells += [f"{x[t]:.3f}" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Commands of the chosen tuned rows (run through `tune.run`):", ""]
    lines += [f"- `{rows[label]['command']}`" for label, spec, _ in jobs if spec is not None and label in rows]
    update_section("tune", "\n".join(lines))


if __name__ == "__main__":
    main()
