"""The gate against exact enumeration at every budget and calibration seed: rank, KL regret, wall time.

    CLP_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/bench_gate.py --budgets 3,6,9,12,15 --seeds 0,1
    CLP_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/bench_gate.py --budgets 6,9 --seeds 0 --segments 2

For S = 1 the oracle is baselines.exhaustive (every contiguous block); for S = 2 it is
baselines.exhaustive_segments (every placement of two non-overlapping blocks with the gate's widths).
Both score placements by the calibration KL on the same cached dense pass as the gate. Every finished
cell (one oracle ranking, or one gate run) is kept in --results under a key naming the model
fingerprint, the calibration draw, the budget and the settings, so a rerun only computes what is
missing, and a change of the search (--variant) reruns the gate against the stored rankings. An oracle
in progress keeps each scored placement in --work, so an interrupted enumeration (hours for S = 2 on a
CPU) continues where it stopped; its time is the sum of the scoring times of every run.
Rewrites the "gate" section of BENCHMARKS.md from every stored row.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gates  # noqa: E402
import load_weights  # noqa: E402
import teacher as teachers  # noqa: E402
from benchmarks.common import command, load_cells, store_cell, update_section  # noqa: E402
from benchmarks.gate_cells import (CURRENT, HISTORY, RESULTS, gate_cell, key, oracle_cell, oracle_partial,  # noqa: E402
                                   regret_row, replay_v1, variant_for)

def section(res, a, L):
    lines = [f"## Search: the gate against exact enumeration at every budget ({a.ckpt}, {L} layers)", "",
             f"Command: `CLP_DATA=../shared/data OMP_NUM_THREADS=1 {command().replace(' --write-only', '')}` "
             "(rows of other budgets, seeds and variants come from the same script with other flags)", "",
             f"Calibration: WikiText-2 valid, {a.nsamples} random windows x {a.seqlen} tokens drawn with each seed; the "
             "gate runs with search.py's defaults (4 starts, successive halving, 30 steps of one window, tau 2 -> 0.05, "
             "radius 1); the oracle scores every placement (S = 1: every contiguous block; S = 2: every pair of "
             "non-overlapping blocks with the gate's widths, placements sharing their first block sharing the states up to "
             "their second one: baselines.score_placements) by the calibration KL on the same cached dense pass. "
             "Variants: v1 = exact read-off from the surviving starts' blocks and a walk to a local minimum (as first built); "
             "v2 = the same, after also scoring every block a start's rounded window visited (stopped starts included); "
             "v3 = v2 whose walk may also move one block next to another (multi-segment only: for S = 1 it is v2); "
             "v4 = v3 followed by a walk that moves one layer from the end of a block to just outside one (the blocks' "
             "widths change), v5 = the same walk, which may also move one whole block anywhere it fits (both multi-segment only; run as v3's stored run continued: the gate steps and "
             "first walk are the same); v6 = v5 followed by a walk whose moves also put back any removed layer and remove any kept one, "
             "which can split a block (run as v5's stored run continued); v7 = v6 whose swap walk goes on until the two best "
             "placements have been expanded (run as v6's stored run continued). A v4-v7 placement may leave the oracle's widths: its rank is then '-', and its "
             "regret, measured against the fixed-width optimum, can be negative. "
             "*v1 (replayed)*: v1's read-off walk from the survivors' blocks of the v2 run, on the oracle's exact KLs (the "
             "gate steps are the same; its time is not measured). *Regret*: gate KL minus the optimum's. *scored*: placements the gate scored exactly. Times are wall times on a 2-core machine shared with other jobs, "
             "1 thread: compare them within a row, not across rows. Rows: every cell stored in "
             "`benchmarks/results/gate.json`.", "",
             "| S | k | seed | variant | gate block | gate KL | optimum | optimum KL | rank | regret | scored | gate s | oracle s | gate / oracle |",
             "|---:|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = sorted((v for v in res.values() if v.get("kind") == "gate"), key=lambda v: (v["S"], v["k"], v["seed"], v["variant"]))
    have = {(g["oracle_key"], g["variant"]) for g in rows}
    for g in list(rows):  # v1 replayed on v2's runs where v1 did not run itself
        if g["variant"] == "v2" and g["S"] == 1 and g.get("read") and (g["oracle_key"], "v1") not in have \
                and g["oracle_key"] in res:
            v1 = replay_v1(g["read"], res[g["oracle_key"]], L, g["k"])
            rows.append(dict(g, **v1, variant="v1 (replayed)", seconds=float("nan")))
    rows.sort(key=lambda v: (v["S"], v["k"], v["seed"], v["variant"]))
    for g in rows:
        orc = res.get(g["oracle_key"])
        if orc is None:
            continue
        r = regret_row(g, orc)
        rank = f"{r['rank']} of {r['of']}" if r["rank"] else "-"
        lines.append(f"| {g['S']} | {g['k']} | {g['seed']} | {g['variant']} | {gates.span(g['removed_layers'])} "
                     f"| {g['kl']:.4f} | {gates.span(r['best'])} | {r['best_kl']:.4f} | {rank} "
                     f"| {r['regret']:.4f} | {g['scored']} of {r['of']} | {g['seconds']:,.0f} | {orc['seconds']:,.0f} | {g['seconds'] / orc['seconds']:.2f} |".replace("| nan", "| -"))
    pending = [g for g in rows if g["oracle_key"] not in res]
    if pending:
        lines += ["", "Gate runs whose oracle is not stored yet (rerun the command to add it): " + "; ".join(
            f"S={g['S']} k={g['k']} seed {g['seed']} {g['variant']}: {gates.span(g['removed_layers'])} (KL {g['kl']:.4f}, "
            f"{g['seconds']:,.0f} s, {g['scored']} placements scored)" for g in pending) + "."]
    update_section("gate", "\n".join(lines))
    return lines


def build_parser():
    """The command line, built without running anything (tests/test_docs.py reads its flags)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=load_weights.DEFAULT, help="checkpoint to prune")
    p.add_argument("--budgets", default="3,6,9,12,15", help="comma-separated numbers of layers to remove")
    p.add_argument("--seeds", default="0,1", help="calibration seeds")
    p.add_argument("--segments", type=int, default=1, help="segments of the gate (and of the oracle's placements)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows (WikiText-2 valid)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--variant", default=CURRENT, choices=list(HISTORY),
                   help="version of the search to run (gate_cells.HISTORY; v1 and v2 rows are stored or replayed)")
    p.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=True,
                   help="also enumerate every placement (--no-oracle: the gate runs only; their rows wait for it)")
    p.add_argument("--results", type=Path, default=RESULTS, help="JSON of finished cells (resumed, never recomputed)")
    p.add_argument("--work", type=Path, default=Path("runs/bench_gate"), help="an unfinished oracle's scored placements")
    p.add_argument("--write-only", action="store_true", help="run nothing: rewrite the section from the stored cells")
    return p


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    res = load_cells(a.results)
    model, tok = load_weights.load(a.ckpt)
    fp = load_weights.fingerprint(model)["embed_sha256"]
    for seed in ([] if a.write_only else map(int, a.seeds.split(","))):
        teacher = None
        for k in map(int, a.budgets.split(",")):
            base = key(fp, f"{a.nsamples}x{a.seqlen}", seed, k, a.segments)
            ok, gk = key(base, "oracle"), key(base, "gate", variant_for(a.segments, a.variant))
            if gk in res and (ok in res or not a.oracle):
                continue
            teacher = teacher or teachers.make_teacher(model, tok, "wikitext2", a.nsamples, a.seqlen, seed)
            if gk not in res:
                store_cell(a.results, res, gk, gate_cell(model, teacher, k, a.segments, seed, a.variant, res, base))
            if ok not in res and a.oracle:
                store_cell(a.results, res, ok, oracle_cell(model, teacher, k, a.segments, base, a.work))
                oracle_partial(base, a.work).unlink(missing_ok=True)
            print("\n".join(section(res, a, model.cfg.num_layers)[-1:]), flush=True)
    print("\n".join(section(res, a, model.cfg.num_layers)))


if __name__ == "__main__":
    main()
