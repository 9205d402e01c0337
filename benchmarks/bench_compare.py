"""CLP against every layer-pruning baseline at the same pruning ratios, untuned and tuned the same way: one table.

    CLP_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/bench_compare.py --ckpt smollm2-135m --ratios 0.1 0.2 0.3 0.4

For each ratio and method: the removed layers, their calibration KL and search time; WikiText-2 test
perplexity and KL to the dense model (the first --ppl-windows windows of 2048 tokens, the same for
every row); zero-shot accuracy on the first --limit items of each task with the mean retention; the
prefill / decode speedup against the ideal L/(L-k) (one measurement per ratio: every method's pruned
model has the same architecture). Then the same after repair, one budget for every method: --steps
AdamW steps of tune.py on the cut's endpoints (every cut's, for a method that leaves several), and for
the non-contiguous methods also LoRA on all layers with the trainable parameters of two full layers
(what CLP tunes); each at every --lrs, the lowest held-out KL kept, as bench_tune.py does.

Resumable: every finished cell (a method's choice, a SLEB step, an evaluation, a tuning run, a latency
measurement) is stored in --results under a key naming the checkpoint's fingerprint and the settings
that produced it, and never recomputed; the same command continues where a run stopped. The gate's and
the exhaustive oracle's runs are bench_gate.py's cells (--gate-results), shared with that script.
Writes the "compare" section of BENCHMARKS.md and a picture (--plot) from every stored cell.
"""
import argparse
import math
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import eval as ev  # noqa: E402
import load_weights  # noqa: E402
import search  # noqa: E402
from benchmarks import bench_gate  # noqa: E402
from benchmarks.common import BENCHMARKS, ROOT, command, update_section  # noqa: E402
from benchmarks.compare_cells import (CHEAP_FIRST, METHODS, NEW_TOKENS, TASKS, Bench, DenseLogits, Missing, choose,  # noqa: E402
                                      evaluate, repaired, speed, variants, work_dir)
from gates import budget  # noqa: E402
from tasks import PRIMARY  # noqa: E402

# ---------------------------------------------------------------- the loop

def run_all(b):
    a = b.a
    ks = {r: budget(b.L, prune_ratio=r) for r in a.ratios}
    order = [m for m in CHEAP_FIRST if m in a.methods]
    b.rows, full = {}, a.full_ppl
    evaluate(b, [], full=full and "untuned" in a.stages)
    if "untuned" in a.stages and not full:
        speed(b, depths(b))
    for stage in a.stages:
        # CLP, then the cheap methods first, at every ratio, so an interrupted run has whole columns of the table
        for method in order:
            for r in a.ratios:
                k = ks[r]
                ch = choose(b, method, k)
                print(f"-- {r:.0%} {method}: layers {search.span(ch['removed_layers'])}  calib KL {ch['kl']:.4f}", flush=True)
                if stage == "untuned":
                    evaluate(b, ch["removed_layers"], full=full)
                else:
                    for v in variants(ch["removed_layers"]):
                        repaired(b, ch["removed_layers"], v, full)
                    shutil.rmtree(work_dir(b, ch["removed_layers"]), ignore_errors=True)
                write_outputs(b, picture=False)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=load_weights.DEFAULT, help="dense checkpoint to prune")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4], help="pruning ratios, k = round(ratio * L)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (random-N: the random contiguous block of seed N)")
    p.add_argument("--stages", default="untuned,tuned", help="untuned, tuned or both (all untuned cells run first)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows of WikiText-2 valid, shared by every method")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration and tuning window")
    p.add_argument("--seed", type=int, default=0, help="calibration seed")
    p.add_argument("--ppl-windows", type=int, default=2, help="first N WikiText-2 test windows for ppl and KL")
    p.add_argument("--ppl-seqlen", type=int, default=2048, help="tokens per WikiText-2 test window")
    p.add_argument("--tasks", default=TASKS, help="zero-shot tasks (comma-separated)")
    p.add_argument("--limit", type=int, default=50, help="first N items of each task")
    p.add_argument("--steps", type=int, default=30, help="tuning steps of every repair")
    p.add_argument("--lrs", default="1e-3,3e-3", help="peak learning rates tried per method and repair; lowest held-out KL kept")
    p.add_argument("--batch-size", type=int, default=4, help="windows per tuning step")
    p.add_argument("--tune-nsamples", type=int, default=32, help="tuning windows (first 90%% of WikiText-2 valid)")
    p.add_argument("--latency-seqlen", type=int, default=512, help="prefill tokens of the latency measurement")
    p.add_argument("--latency-runs", type=int, default=5, help="timed interleaved rounds (median) after one warm-up")
    p.add_argument("--data-dir", type=Path, default=None, help="data directory; None: $CLP_DATA, then ./data")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "compare.json", help="finished cells")
    p.add_argument("--gate-results", type=Path, default=bench_gate.RESULTS, help="bench_gate.py's cells (gate and oracle runs)")
    p.add_argument("--work", type=Path, default=Path("runs/bench_compare"), help="pruned and tuned checkpoints (deleted once evaluated)")
    p.add_argument("--markdown", type=Path, default=BENCHMARKS, help="file whose 'compare' section is rewritten")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "compare.png", help="picture of ppl and retention vs ratio")
    p.add_argument("--full-ppl", action="store_true", help="measure only perplexity on the whole WikiText-2 test set, for the "
                   "--methods, --ratios and --stages given (the headline rows; a repair is tuned again if its checkpoint is gone)")
    p.add_argument("--write-only", action="store_true", help="run nothing: rewrite the section and the picture from stored cells")
    a = p.parse_args(argv)
    a.methods, a.stages = a.methods.split(","), a.stages.split(",")
    bad = [m for m in a.methods if m not in METHODS and not m.startswith("random-")] + \
          [s for s in a.stages if s not in ("untuned", "tuned")]
    if bad:
        p.error(f"unknown method or stage {bad[0]!r}: methods are {', '.join(METHODS)}; stages untuned, tuned")
    return a


def main(argv=None):
    a = parse_args(argv)
    b = Bench(a)
    b.tasks = a.tasks.split(",") if a.tasks else []
    (w, b.ppl_desc), = ev.text_windows(b.tok, ["wikitext2"], a.ppl_seqlen, a.data_dir, bos=False).values()
    b.ppl_total, b.windows, b.all_windows = w.shape[0], w[: a.ppl_windows], w
    b.dense_logits = None if a.write_only or a.full_ppl else DenseLogits(b.model, b.windows)
    if not a.write_only:
        run_all(b)
    write_outputs(b)


# ---------------------------------------------------------------- the table and the picture

def lookup(b, f, *args):
    """f(b, *args) from the stored cells only; None when a cell is missing."""
    b.readonly = True
    try:
        return f(b, *args)
    except Missing:
        return None
    finally:
        b.readonly = False


# score of a uniform guess per task: a ratio to a dense score at or below it measures noise, not retention
CHANCE = {"piqa": 0.5, "winogrande": 0.5, "boolq": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25, "openbookqa": 0.25,
          "hellaswag": 0.25}


def informative(b):
    """The tasks on which the dense model scores above chance (on the evaluated items)."""
    dense = lookup(b, evaluate, [])
    return [t for t in b.tasks if dense and dense["tasks"][t][PRIMARY[t]] > CHANCE.get(t, 0)]


def retention(b, row, tasks=None):
    """Mean over tasks of pruned / dense primary metric, and its standard error from the pruned scores' binomial errors."""
    dense = lookup(b, evaluate, [])
    tasks = b.tasks if tasks is None else tasks
    if row is None or dense is None or not tasks:
        return None, None
    ret, var = [], 0.0
    for t in tasks:
        p, d, n = row["tasks"][t][PRIMARY[t]], dense["tasks"][t][PRIMARY[t]], row["tasks"][t]["n"]
        ret.append(p / d)
        var += p * (1 - p) / max(n - 1, 1) / d ** 2
    return statistics.mean(ret), math.sqrt(var) / len(ret)


def results(b):
    """{(ratio, method): {"choice", "untuned", "tuned": {variant: row}, "best_tuned"}} for every stored cell."""
    out = {}
    for r in b.a.ratios:
        k = budget(b.L, prune_ratio=r)
        for method in b.a.methods:
            ch = lookup(b, choose, method, k)
            if ch is None:
                continue
            rem = ch["removed_layers"]
            tuned = {v: x for v in variants(rem) if (x := lookup(b, repaired, rem, v)) is not None}
            best = min(tuned.values(), key=lambda x: x["tune"]["heldout_kl"]["after"]) if tuned else None
            out[r, method] = {"choice": ch, "untuned": lookup(b, evaluate, rem), "tuned": tuned, "best_tuned": best}
    return out


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def row_cells(b, row, tasks):
    if row is None:
        return ["not run"] + [""] * (len(tasks) + 3)
    m, se = retention(b, row)
    m2, se2 = retention(b, row, informative(b))
    return [f"{row['ppl']:,.2f}", fmt(row.get("kl"), ".3f")] + \
           [f"{100 * row['tasks'][t][PRIMARY[t]]:.0f}" for t in tasks] + \
           [f"{100 * m:.1f} ± {100 * se:.1f}" if m is not None else "-", f"{100 * m2:.1f} ± {100 * se2:.1f}" if m2 is not None else "-"]


def summary_of(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def table(b, res):
    tasks = b.tasks
    head = ("| ratio | method | removed layers | calib. KL | search s | repair | ppl | KL | "
            + " | ".join(tasks) + " | mean retention % | retention % above chance |")
    lines = [head, "|---|---|---|---:|---:|---|---:|---:|" + "---:|" * len(tasks) + "---:|---:|"]
    dense = lookup(b, evaluate, [])
    if dense:
        lines.append(f"| 0 | dense | - | 0 | - | - | {dense['ppl']:,.2f} | 0 | "
                     + " | ".join(f"{100 * dense['tasks'][t][PRIMARY[t]]:.0f}" for t in tasks) + " | 100 | 100 |")
    for (r, method), x in res.items():
        ch = x["choice"]
        first = [f"{r:.0%}", method, search.span(ch["removed_layers"]), f"{ch['kl']:.3f}", f"{ch['seconds']:,.0f}"]
        lines.append("| " + " | ".join(first + ["none"] + row_cells(b, x["untuned"], tasks)) + " |")
        for v, t in x["tuned"].items():
            what = "endpoints" if v == "endpoints" else f"LoRA r{t['tune']['rank']} all"
            rep = f"{what}, {t['tune']['trainable'] / 1e6:.1f}M, lr {t['lr']:g}"
            lines.append("| " + " | ".join(["", "", "", "", "", rep] + row_cells(b, t, tasks)) + " |")
        if method == [m for (rr, m) in res if rr == r][-1]:
            lines += random_summary(b, res, r, len(tasks))
    return lines


def random_summary(b, res, r, n_tasks):
    """Mean ± spread (sample standard deviation) of the random seeds' rows at ratio r, untuned and repaired."""
    out = []
    for stage, label in (("untuned", "none"), ("best_tuned", "best repair")):
        rows = [x[stage] for (rr, m), x in res.items() if rr == r and m.startswith("random-") and x[stage] is not None]
        if len(rows) < 2:
            continue
        p, sp = summary_of([x["ppl"] for x in rows])
        q, sq = summary_of([retention(b, x)[0] for x in rows])
        cells = [f"{r:.0%}", f"random, mean ± sd of {len(rows)} seeds", "", "", "", label, f"{p:,.2f} ± {sp:,.2f}", ""]
        q2, sq2 = summary_of([retention(b, x, informative(b))[0] for x in rows])
        cells += [""] * n_tasks + ["-" if q is None else f"{100 * q:.1f} ± {100 * sq:.1f}",
                                   "-" if q2 is None else f"{100 * q2:.1f} ± {100 * sq2:.1f}"]
        out.append("| " + " | ".join(cells) + " |")
    return out


# CLP's own rows: the gate with one and two segments and the exact optima of its objective
OURS = ("clp-gate", "exhaustive", "clp-gate-s2", "exhaustive-s2")


def margins(b, res):
    """One sentence per ratio and stage: CLP against the best other method on ppl and on mean retention."""
    out = []
    for r in b.a.ratios:
        for stage in ("untuned", "best_tuned"):
            val = {}
            for m in b.a.methods:
                row = res.get((r, m), {}).get(stage)
                if row is not None:
                    val[m] = (row["ppl"], retention(b, row, informative(b))[0])
            rnd = [val.pop(m) for m in list(val) if m.startswith("random-")]
            if len(rnd) >= 2:  # a mean of one seed is that seed's block, not "random"
                val["random (mean)"] = (statistics.mean(v[0] for v in rnd), summary_of([v[1] for v in rnd])[0])
            others = {m: v for m, v in val.items() if m not in OURS}
            if "clp-gate" not in val or not others:
                continue
            (p, q), name = val["clp-gate"], "untuned" if stage == "untuned" else "tuned (each method's repair with the lower held-out KL)"
            bp = min(others, key=lambda m: others[m][0])
            rel, diff = p / others[bp][0] - 1, None
            txt = (f"- {r:.0%}, {name}: CLP ppl {p:,.2f}, best other ({bp}) {others[bp][0]:,.2f}: "
                   + ("the same" if abs(rel) < 5e-4 else f"CLP {100 * abs(rel):.1f}% {'higher (worse)' if rel > 0 else 'lower (better)'}"))
            if q is not None and any(v[1] is not None for v in others.values()):
                br = max((m for m in others if others[m][1] is not None), key=lambda m: others[m][1])
                diff = 100 * (q - others[br][1])
                txt += (f"; mean retention {100 * q:.1f}%, best other ({br}) {100 * others[br][1]:.1f}%: "
                        + ("the same" if abs(diff) < 0.05 else f"CLP {abs(diff):.1f} points {'higher' if diff > 0 else 'lower'}"))
            out.append(txt + ".")
            if "clp-gate-s2" in val:
                (p2, q2), c1, c2 = val["clp-gate-s2"], res[r, "clp-gate"]["choice"], res[r, "clp-gate-s2"]["choice"]
                txt = (f"  Two segments: {search.span(c2['removed_layers'])} against {search.span(c1['removed_layers'])}, "
                       f"calib. KL {c2['kl']:.3f} vs {c1['kl']:.3f}, ppl {p2:,.2f} vs {p:,.2f}")
                if q is not None and q2 is not None:
                    txt += f", retention {100 * q2:.1f}% vs {100 * q:.1f}%"
                out.append(txt + ".")
    return out


def depths(b):
    """The pruned models' numbers of layers, one per ratio."""
    return [b.L - budget(b.L, prune_ratio=r) for r in b.a.ratios]


def speed_lines(b, s):
    if s is None:
        return ["(not measured yet)"]
    d = s[str(b.L)]
    lines = ["| ratio | layers | prefill tok/s | decode tok/s | prefill speedup (range over rounds) | "
             "decode speedup (range over rounds) | ideal L/(L-k) |", "|---|---:|---:|---:|---:|---:|---:|"]

    def ratio(kind, x):  # ratio of the medians, and the range of the ratios of the same round
        per_round = [a / c for a, c in zip(d[f"{kind}_s"]["runs"], x[f"{kind}_s"]["runs"])]
        return f"{d[f'{kind}_s']['median'] / x[f'{kind}_s']['median']:.2f} ({min(per_round):.2f}-{max(per_round):.2f})"
    for r in [0.0, *b.a.ratios]:
        n = b.L - budget(b.L, prune_ratio=r) if r else b.L
        x = s[str(n)]
        lines.append(f"| {r:.0%} | {n} | {x['prefill_tok_s']:,.0f} | {x['decode_tok_s']:,.1f} | {ratio('prefill', x)} | "
                     f"{ratio('decode', x)} | {b.L / n:.2f} |")
    return lines


def write_outputs(b, picture=True):
    a, res, sp = b.a, results(b), lookup(b, speed, depths(b))
    lines = [f"## CLP against layer-pruning baselines, untuned and repaired ({a.ckpt}, {b.L} layers)", "",
             f"Command: `CLP_DATA=../shared/data OMP_NUM_THREADS=1 {command().replace(' --write-only', '')}` (the same command resumes; "
             f"cells: `{a.results.name}`, gate and oracle cells: `{a.gate_results.name}` in benchmarks/results/).", "",
             f"Calibration for every method: WikiText-2 valid, {a.nsamples} random windows x {a.seqlen} tokens (seed {a.seed}); "
             "*calib. KL* is the KL to the dense model on them with the layers removed; *search s* the wall time of the "
             "method's choice (gate: search.py defaults; exhaustive: every contiguous block; -s2: the gate with two segments "
             "and the exact optimum over every placement of two blocks; SLEB: k greedy steps; "
             "times on a shared 2-core machine, 1 thread). "
             f"*ppl*, *KL*: WikiText-2 test, first {a.ppl_windows} of {getattr(b, 'ppl_total', '?')} windows of {a.ppl_seqlen} tokens "
             "(a subset, the same for every row). Zero-shot: lm-eval formats, primary metric per task (acc_norm; acc for "
             f"BoolQ and WinoGrande) in %, on the first {a.limit} items of each task: one standard error is about "
             f"{100 * math.sqrt(0.25 / max(a.limit - 1, 1)):.0f} points per task; *mean retention* = mean over tasks of "
             "pruned / dense, ± its standard error from the pruned scores; *above chance*: the same over the tasks on which "
             f"the dense model beats a uniform guess on these items ({', '.join(informative(b)) or 'none'}): a ratio to a "
             "chance-level score is noise. "
             f"*Repair*: {a.steps} AdamW steps of tune.py ({a.batch_size} windows x {a.seqlen} tokens from {a.tune_nsamples} "
             "windows of the first 90% of WikiText-2 valid, KL to the dense model), at each peak lr in "
             f"{{{a.lrs}}}, the lowest held-out KL kept; *endpoints* = the kept layers next to every cut (tune.py's "
             "default); non-contiguous methods also get *LoRA on all layers* with as many trainable parameters as two "
             "full layers. random-N: the random contiguous block of seed N.", "", *table(b, res), "",
             "Where CLP stands (the best other method excludes CLP's two-segment rows and the exhaustive oracles, which are CLP's own objective "
             "enumerated; random = mean of its seeds; retention above chance):", "", *(margins(b, res) or ["- no ratio has both CLP and a baseline yet."]), "",
             "Speed (every method's pruned model at a ratio has the same architecture, so one model per ratio: the dense "
             "model and every pruned depth timed in the same interleaved rounds, latency.py; batch 1, prefill "
             f"{a.latency_seqlen} tokens, decode {NEW_TOKENS} tokens after a 128-token prompt, {a.latency_runs} timed rounds; "
             "speedup = ratio of the median times, in brackets the range of the same-round ratios; 1-minute load "
             f"average {sp['load'] if sp else float('nan'):.1f} at the end on this 2-core machine):", "", *speed_lines(b, sp), "",
             *whole_test_set(b, res), f"![ppl and mean retention against the pruning ratio](docs/img/{a.plot.name})"]
    update_section("compare", "\n".join(lines), a.markdown)
    if picture:
        plot(b, res, a.plot)
    print("\n".join(lines))


def whole_test_set(b, res):
    """The rows measured again on every WikiText-2 test window (--full-ppl), beside their subset figure."""
    lines = []
    for (r, method), x in res.items():
        rem = x["choice"]["removed_layers"]
        for tag, sub in [(None, x["untuned"])] + [(f"{v}@{t['lr']:g}", t) for v, t in x["tuned"].items()]:
            f = lookup(b, evaluate, rem, tag, True)
            if f is None or sub is None:
                continue
            what = "none" if tag is None else f"{sub['variant']}, lr {sub['lr']:g}"
            check = "" if tag is None else f"{sub['tune']['heldout_kl']['after']:.4f}"
            if "retuned_heldout_kl" in f:
                check += f" / {f['retuned_heldout_kl']:.4f}"
            lines.append(f"| {r:.0%} | {method} | {search.span(rem)} | {what} | {sub['ppl']:,.2f} | {f['ppl']:,.2f} | {check} |")
    if not lines:
        return []
    dense = lookup(b, evaluate, [], None, True)
    n = getattr(b, "ppl_total", "?")
    return [f"Whole test set (all {n} windows of {b.a.ppl_seqlen} tokens, perplexity only; `--full-ppl` with the same "
            "command and the rows' --methods, --ratios and --stages). A repair's checkpoint is deleted once evaluated, so "
            "it was tuned again with the same seed and data; *held-out KL*: the stored run's, then the new run's.", "",
            "| ratio | method | removed layers | repair | ppl, first " f"{b.a.ppl_windows} windows | ppl, all {n} windows | held-out KL |",
            "|---|---|---|---|---:|---:|---:|",
            *([f"| 0 | dense | - | - | {lookup(b, evaluate, [])['ppl']:,.2f} | {dense['ppl']:,.2f} | |"] if dense else []),
            *lines, ""]


def plot(b, res, path):
    """Perplexity and mean retention against the ratio, one line per method, solid untuned, dashed repaired."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("no picture: matplotlib is missing (pip install matplotlib)")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [m for m in b.a.methods if not m.startswith("random-")] + ["random"]
    for i, name in enumerate(names):
        color = plt.cm.tab20(i % 20)
        for stage, style in (("untuned", "-"), ("best_tuned", "--")):
            xs, ppl, ret = [], [], []
            for r in b.a.ratios:
                rows = [x[stage] for (rr, m), x in res.items() if rr == r and (m == name or
                        (name == "random" and m.startswith("random-"))) and x[stage] is not None]
                if rows and (name != "random" or len(rows) >= 2):
                    xs.append(r)
                    ppl.append(statistics.mean(x["ppl"] for x in rows))
                    ret.append(summary_of([retention(b, x, informative(b))[0] for x in rows])[0])
            if xs:
                label = f"{name} ({'untuned' if stage == 'untuned' else 'repaired'})"
                ax1.plot(xs, ppl, style, color=color, marker="o", label=label)
                if any(v is not None for v in ret):
                    ax2.plot(xs, [v if v is not None else float("nan") for v in ret], style, color=color, marker="o")
    shown = [x["ppl"] for row in res.values() for x in [row["untuned"]] if x and row["choice"]["kl"] < 10]
    top = 3 * max(shown) if shown else None  # None: a run over blocks that all destroy the model (e.g. only tail)
    ax1.set(yscale="log", ylim=(None, top), xlabel="pruning ratio", ylabel="WikiText-2 ppl (subset)",
            title="perplexity (lower is better; off the top: calib. KL > 10)")
    ax2.set(xlabel="pruning ratio", ylabel="mean zero-shot retention", title="retention, tasks above chance (higher is better)")
    fig.legend(*ax1.get_legend_handles_labels(), loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    print(f"picture: {path}")

if __name__ == "__main__":
    main()
