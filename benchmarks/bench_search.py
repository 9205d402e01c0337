"""The gate against the exhaustive oracle on the embedded model: block, calibration KL, rank, perplexity, wall time.

    OMP_NUM_THREADS=1 python benchmarks/bench_search.py

Rewrites the "search" section of BENCHMARKS.md. Both methods use the same cached calibration pass.
Perplexity is WikiText-2 test with the protocol of docs/protocols.md, on the first --ppl-windows windows of
2048 tokens (a stated subset: the same windows for every row).
"""
import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import baselines  # noqa: E402
import data  # noqa: E402
import gates  # noqa: E402
import load_weights  # noqa: E402
import search  # noqa: E402
from benchmarks.common import ROOT, command, update_section  # noqa: E402
from machinery import atomic  # noqa: E402
from teacher import log_probs, make_teacher, run_layers  # noqa: E402


@torch.no_grad()
def perplexity(model, windows, removed=()):
    """exp(mean next-token NLL) over the windows, with the layers in `removed` skipped."""
    nll, n = 0.0, 0
    for w in windows:
        x = run_layers(model, model.embed_tokens(w[None]), 0, removed=set(removed))
        logp = log_probs(model, x[0, :-1])  # (T-1, V)
        nll -= float(logp.gather(-1, w[1:, None]).sum())
        n += len(w) - 1
    return math.exp(nll / n)


def compare(model, teacher, k, windows, gate_settings):
    """One budget: gate search, exhaustive enumeration, rank and perplexity of both blocks."""
    t0 = time.perf_counter()
    gate = search.search(model, teacher, k, **gate_settings, log_every=5)
    t_gate = time.perf_counter() - t0
    t0 = time.perf_counter()
    ranked = baselines.exhaustive(model, teacher, k)
    t_exh = time.perf_counter() - t0
    blocks = [r["removed_layers"] for r in ranked]
    rank = blocks.index(gate["removed_layers"]) + 1
    ppl = {gates.span(b): perplexity(model, windows, b) for b in (gate["removed_layers"], blocks[0])}
    return {"k": k, "gate": gate["removed_layers"], "gate_kl": gate["kl"], "rank": rank, "of": len(ranked),
            "best": blocks[0], "best_kl": ranked[0]["kl"], "gap": gate["kl"] / ranked[0]["kl"] - 1,
            "t_gate": t_gate, "t_exhaustive": t_exh, "ppl": ppl, "ranked": ranked,
            "candidates": [c["removed_layers"] for c in gate["candidates"]]}


def table(rows, dense_ppl, L):
    out = ["| budget | method | block | calib. KL | rank of block | WikiText-2 ppl | wall time |",
           "|---|---|---|---:|---:|---:|---:|",
           f"| 0 | dense | - | 0 | - | {dense_ppl:,.2f} | - |"]
    for r in rows:
        g, b = gates.span(r["gate"]), gates.span(r["best"])
        out.append(f"| {r['k']}/{L} | CLP gate | {g} | {r['gate_kl']:.4f} | {r['rank']} of {r['of']} "
                   f"| {r['ppl'][g]:,.2f} | {r['t_gate']:,.0f} s |")
        out.append(f"| {r['k']}/{L} | exhaustive | {b} | {r['best_kl']:.4f} | 1 of {r['of']} "
                   f"| {r['ppl'][b]:,.2f} | {r['t_exhaustive']:,.0f} s |")
    return "\n".join(out)


def seed_rows(model, tok, a):
    """Gate vs exhaustive on other calibration draws: block, KL gap, rank and times (no perplexity).

    The section is rewritten after every row, so an interrupted run still leaves what it measured."""
    head = ["## Search: the gate on other calibration draws", "",
            f"Command: `OMP_NUM_THREADS=1 {command()}`", "",
            f"WikiText-2 valid, {a.nsamples} random windows x {a.seqlen} tokens drawn with each seed; search.py defaults.", "",
            "| seed | k | gate block | gate KL | exhaustive optimum | optimum KL | rank | gap | gate time | exhaustive time |",
            "|---|---|---|---:|---|---:|---:|---:|---:|---:|"]
    rows = []
    for seed in map(int, a.seeds.split(",")):
        teacher = make_teacher(model, tok, "wikitext2", a.nsamples, a.seqlen, seed)
        for k in map(int, a.budgets.split(",")):
            t0 = time.perf_counter()
            gate = search.search(model, teacher, k, seed=seed, log_every=10)
            t1 = time.perf_counter()
            ranked = baselines.exhaustive(model, teacher, k)
            t2 = time.perf_counter()
            rank = [r["removed_layers"] for r in ranked].index(gate["removed_layers"]) + 1
            rows.append(f"| {seed} | {k} | {gates.span(gate['removed_layers'])} | {gate['kl']:.4f} "
                        f"| {gates.span(ranked[0]['removed_layers'])} | {ranked[0]['kl']:.4f} | {rank} of {len(ranked)} "
                        f"| {100 * (gate['kl'] / ranked[0]['kl'] - 1):.2f}% | {t1 - t0:,.0f} s | {t2 - t1:,.0f} s |")
            print(rows[-1], flush=True)
            update_section("search-seeds", "\n".join(head + rows))
    return head + rows


def build_parser():
    """The command line, built without running anything (tests/test_docs.py reads its flags)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=load_weights.DEFAULT, help="checkpoint to prune")
    p.add_argument("--budgets", default="6,9", help="comma-separated numbers of layers to remove")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows (WikiText-2 valid)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--ppl-windows", type=int, default=20, help="first N WikiText-2 test windows of 2048 tokens")
    p.add_argument("--seed", type=int, default=0, help="calibration seed")
    p.add_argument("--seeds", default=None, help="instead: gate vs exhaustive only (no perplexity) for these seeds, "
                                                  "written to the section search-seeds")
    return p


def main():
    p = build_parser()
    a = p.parse_args()
    model, tok = load_weights.load(a.ckpt)
    if a.seeds:
        return print("\n".join(seed_rows(model, tok, a)))
    L = model.cfg.num_layers
    t0 = time.perf_counter()
    teacher = make_teacher(model, tok, "wikitext2", a.nsamples, a.seqlen, a.seed)
    t_teacher = time.perf_counter() - t0
    text, desc = data.load_text("wikitext2", "test")
    windows = data.eval_windows(tok.encode(text), 2048)
    n_all, windows = len(windows), windows[: a.ppl_windows]
    dense_ppl = perplexity(model, windows)
    gate_settings = {}  # search()'s defaults, the same as search.py's
    rows = [compare(model, teacher, k, windows, gate_settings) for k in map(int, a.budgets.split(","))]
    atomic.write_json(ROOT / "runs" / "bench_search.json", {"rows": rows, "dense_ppl": dense_ppl})
    body = [f"## Search: CLP gate vs exhaustive contiguous enumeration ({a.ckpt}, {L} layers)", "",
            f"Command: `OMP_NUM_THREADS=1 {command()}`", "",
            f"Calibration: {teacher.description}; the same cached dense pass ({t_teacher:.0f} s, not in the times "
            f"below) serves both methods. Gate: search.py's default settings (4 starts with successive halving, 30 steps of "
            f"one window, tau 2 -> 0.05, neighbour radius 1). Threads: {torch.get_num_threads()}.",
            f"Perplexity: {desc}, first {len(windows)} of {n_all} windows of 2048 tokens (a subset, the same for every row).",
            "", table(rows, dense_ppl, L), ""]
    for r in rows:
        body.append(f"- {r['k']} layers: gate KL is {100 * r['gap']:.2f}% above the optimum; gate time / exhaustive "
                    f"time = {r['t_gate'] / r['t_exhaustive']:.2f}; the gate's read-off scored "
                    f"{len(r['candidates'])} blocks exactly. Five best blocks: "
                    + ", ".join(f"{gates.span(x['removed_layers'])} ({x['kl']:.4f})" for x in r["ranked"][:5]) + ".")
    update_section("search", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
