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
Writes the "compare" section of BENCHMARKS.md and a picture (--plot) from every stored cell
(compare_report.py), with a check of whether the repair keeps the order of the removed sets.

The headline rows on the whole WikiText-2 test set (perplexity only, slow: every window):

    ... bench_compare.py --full-ppl --stages tuned --methods clp-gate,shortened-ppl --ratios 0.2

A repair's checkpoint is deleted once evaluated, so that run tunes the chosen lr again (same seed, same
data) and stores the held-out KL it reaches, which must equal the stored run's. Runs over a subset of the
methods or ratios rewrite the section with their own command: finish with the full command and --write-only.
"""
import argparse
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import eval as ev  # noqa: E402
import gates  # noqa: E402
import load_weights  # noqa: E402
from benchmarks import gate_cells  # noqa: E402
from benchmarks.common import BENCHMARKS, ROOT, command, update_section  # noqa: E402
from benchmarks.compare_cells import (CHEAP_FIRST, METHODS, NEW_TOKENS, TASKS, Bench, DenseLogits, choose,  # noqa: E402
                                      evaluate, repaired, speed, variants, work_dir)
from benchmarks.compare_report import (headline, informative, lookup, margins, plot, repair_ranking, results,  # noqa: E402
                                       speed_lines, table, whole_test_set)
from gates import budget  # noqa: E402

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
                print(f"-- {r:.0%} {method}: layers {gates.span(ch['removed_layers'])}  calib KL {ch['kl']:.4f}", flush=True)
                if stage == "untuned":
                    evaluate(b, ch["removed_layers"], full=full)
                else:
                    for v in variants(ch["removed_layers"]):
                        repaired(b, ch["removed_layers"], v, full)
                    shutil.rmtree(work_dir(b, ch["removed_layers"]), ignore_errors=True)
                write_outputs(b, picture=False)


def build_parser():
    """The command line, built without running anything (tests/test_docs.py reads its flags)."""
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
    p.add_argument("--gate-results", type=Path, default=gate_cells.RESULTS, help="bench_gate.py's cells (gate and oracle runs)")
    p.add_argument("--work", type=Path, default=Path("runs/bench_compare"), help="pruned and tuned checkpoints (deleted once evaluated)")
    p.add_argument("--markdown", type=Path, default=BENCHMARKS, help="file whose 'compare' section is rewritten")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "compare.png", help="picture of ppl and retention vs ratio")
    p.add_argument("--full-ppl", action="store_true", help="measure only perplexity on the whole WikiText-2 test set, for the "
                   "--methods, --ratios and --stages given (the headline rows; a repair is tuned again if its checkpoint is gone)")
    p.add_argument("--write-only", action="store_true", help="run nothing: rewrite the section and the picture from stored cells")
    return p


def parse_args(argv=None):
    p = build_parser()
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

def depths(b):
    """The pruned models' numbers of layers, one per ratio."""
    return [b.L - budget(b.L, prune_ratio=r) for r in b.a.ratios]


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
             "full layers. random-N: the random contiguous block of seed N.", "", *headline(b, res), *table(b, res), "",
             "Where CLP stands (the best other method excludes CLP's two-segment rows and the exhaustive oracles, which are CLP's own objective "
             "enumerated; random = mean of its seeds; retention above chance):", "", *(margins(b, res) or ["- no ratio has both CLP and a baseline yet."]), "",
             "Speed (every method's pruned model at a ratio has the same architecture, so one model per ratio: the dense "
             "model and every pruned depth timed in the same interleaved rounds, latency.py; batch 1, prefill "
             f"{a.latency_seqlen} tokens, decode {NEW_TOKENS} tokens after a 128-token prompt, {a.latency_runs} timed rounds; "
             "speedup = ratio of the median times, in brackets the range of the same-round ratios; 1-minute load "
             f"average {sp['load'] if sp else float('nan'):.1f} at the end on this 2-core machine):", "", *speed_lines(b, sp), "",
             *repair_ranking(b, res), *whole_test_set(b, res), f"![repaired ppl and mean retention against the pruning ratio, the best of each method family](docs/img/{a.plot.name})"]
    update_section("compare", "\n".join(lines), a.markdown, keep_stamp=a.write_only)
    if picture:
        plot(b, res, a.plot)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
