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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import baselines  # noqa: E402
import load_weights  # noqa: E402
import search  # noqa: E402
from benchmarks.common import ROOT, command, load_cells, store_cell, update_section  # noqa: E402
from resume import Scores  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gate.json"


def key(*parts):
    return "|".join(str(p) for p in parts)


def variant_for(segments, variant=search.VARIANT):
    """The name a gate cell is stored under: v3 differs from v2 only in multi-segment walks, so a one-segment
    v3 run is the stored v2 run."""
    read_off, _, _ = search.VARIANTS[variant]
    return "v2" if read_off == "visited" and segments == 1 else variant


def oracle(model, teacher, k, segments, done=None):
    """The exact ranking of every placement, best first, and its wall time. With `done` (resume.Scores) each
    finished placement is kept as it is scored, an interrupted run continues where it stopped, and the time is
    the sum of the scoring times of every run that contributed."""
    t0 = time.perf_counter()
    ranked = baselines.exhaustive(model, teacher, k, done=done) if segments == 1 else \
        baselines.exhaustive_segments(model, teacher, k, segments, done=done)
    seconds = done.seconds if done is not None else time.perf_counter() - t0
    return {"ranked": [[r["removed_layers"], r["kl"]] for r in ranked], "seconds": seconds}


def oracle_partial(base, work):
    """Where an unfinished oracle run keeps its scored placements (an S = 2 enumeration takes hours on a CPU);
    the caller removes it once the finished cell is stored."""
    return Path(work) / f"oracle-{base.replace('|', '_')}.json"


def oracle_cell(model, teacher, k, segments, base, work):
    """The stored form of an oracle run, continuing the placements an interrupted one scored."""
    done = Scores(oracle_partial(base, work), {"cell": key(base, "oracle")})
    reused = len(done.scores)  # placements an interrupted run had scored
    return dict(oracle(model, teacher, k, segments, done), kind="oracle", reused=reused)


def gate_run(model, teacher, k, segments, seed, variant=search.VARIANT):
    t0 = time.perf_counter()
    read_off, merge, resize = search.VARIANTS[variant]
    g = search.search(model, teacher, k, segments=segments, seed=seed, read_off=read_off, merge=merge, resize=resize,
                      log_every=10)
    return {"removed_layers": g["removed_layers"], "kl": g["kl"], "seconds": time.perf_counter() - t0,
            "scored": len(g["candidates"]), "time_s": g["time_s"], "survivors": g["survivors"],
            "candidates": [[c["removed_layers"], c["kl"]] for c in g["candidates"]],
            "read": [c["removed_layers"] for c in g["candidates"] if c["read_off_by_starts"]]}


def gate_cell(model, teacher, k, segments, seed, variant, res, base):
    """The stored form of one gate run: a variant with a second walk continues the longest stored run under `base`
    whose walks begin its own (v4, v5: v3's; v6: v5's, else v3's; v7: v6's, ...) when there is one."""
    v = variant_for(segments, variant)
    prior, walks = stored_prefix(v, res, base)
    run = continue_with_width_walk(model, teacher, prior, segments, walks) if prior else \
        gate_run(model, teacher, k, segments, seed, v)
    return dict(run, kind="gate", S=segments, k=k, seed=seed, variant=v, oracle_key=key(base, "oracle"))


def stored_prefix(v, res, base):
    """(stored run, the walks still to do) for variant v: the stored variant with the same read-off and merge whose
    second walks are the longest prefix of v's, or (None, None)."""
    read_off, merge, resize = search.VARIANTS[v]
    walks = search.WALKS[resize] if resize else ()
    for n in range(len(walks) - 1, -1, -1):
        for name, (r, m, z) in search.VARIANTS.items():
            if (r, m) == (read_off, merge) and (search.WALKS[z] if z else ()) == walks[:n] and key(base, "gate", name) in res:
                return dict(res[key(base, "gate", name)], continued_from=name), walks[n:]
    return None, None


def continue_with_width_walk(model, teacher, prior, segments, walks=(("widths", 1),)):
    """A run that continues a stored one of the same budget and seed whose gate steps and walks are its first ones
    (the same seed, the same numbers): the stored scored placements, continued by the remaining `walks`
    (search.walk_widths); the time is the stored run's plus theirs."""
    t0 = time.perf_counter()
    scored = {tuple(search.layers_to_blocks(layers)): kl for layers, kl in prior["candidates"]}
    for moves, beam in walks:
        search.walk_widths(model, teacher, scored, model.cfg.num_layers, segments, moves=moves, beam=beam)
    dt = time.perf_counter() - t0
    ranked = sorted(([search.blocks_to_layers(b), kl] for b, kl in scored.items()), key=lambda c: c[1])
    return dict(prior, removed_layers=ranked[0][0], kl=ranked[0][1], seconds=prior["seconds"] + dt, scored=len(ranked),
                time_s=dict(prior["time_s"], **{"walk_" + "_".join(f"{m}{b}" for m, b in walks): dt}), candidates=ranked,
                continued_from=prior.get("continued_from", "v3"))


def replay_v1(read, orc, L, k):
    """v1's choice from the same gate steps: the walk from the survivors' blocks alone, on the oracle's exact KLs
    (one segment: the walk is a deterministic function of its start blocks and the KL landscape)."""
    kl = {tuple(layers): v for layers, v in orc["ranked"]}
    score = lambda blocks: kl[tuple(search.blocks_to_layers(blocks))]  # noqa: E731
    scored, expanded, frontier = {}, set(), {((r[0], k),) for r in read}
    while frontier:
        for blocks in set().union(*(search.neighbours(f, L, 1) for f in frontier)) - set(scored):
            scored[blocks] = score(blocks)
        expanded |= frontier
        best = min(scored, key=scored.get)
        frontier = set() if best in expanded else {best}
    return {"removed_layers": search.blocks_to_layers(best), "kl": scored[best], "scored": len(scored)}


def regret_row(gate, orc):
    """Rank of the gate's choice among all placements and its KL above the optimum."""
    layers = [r[0] for r in orc["ranked"]]
    rank = layers.index(gate["removed_layers"]) + 1 if gate["removed_layers"] in layers else None
    best = orc["ranked"][0]
    return {"rank": rank, "of": len(layers), "best": best[0], "best_kl": best[1],
            "regret": gate["kl"] - best[1], "rel": gate["kl"] / best[1] - 1}


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
        lines.append(f"| {g['S']} | {g['k']} | {g['seed']} | {g['variant']} | {search.span(g['removed_layers'])} "
                     f"| {g['kl']:.4f} | {search.span(r['best'])} | {r['best_kl']:.4f} | {rank} "
                     f"| {r['regret']:.4f} | {g['scored']} of {r['of']} | {g['seconds']:,.0f} | {orc['seconds']:,.0f} | {g['seconds'] / orc['seconds']:.2f} |".replace("| nan", "| -"))
    pending = [g for g in rows if g["oracle_key"] not in res]
    if pending:
        lines += ["", "Gate runs whose oracle is not stored yet (rerun the command to add it): " + "; ".join(
            f"S={g['S']} k={g['k']} seed {g['seed']} {g['variant']}: {search.span(g['removed_layers'])} (KL {g['kl']:.4f}, "
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
    p.add_argument("--variant", default=search.VARIANT, choices=list(search.VARIANTS),
                   help="version of the search (search.VARIANTS: what seeds the exact read-off)")
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
            teacher = teacher or search.make_teacher(model, tok, "wikitext2", a.nsamples, a.seqlen, seed)
            if gk not in res:
                store_cell(a.results, res, gk, gate_cell(model, teacher, k, a.segments, seed, a.variant, res, base))
            if ok not in res and a.oracle:
                store_cell(a.results, res, ok, oracle_cell(model, teacher, k, a.segments, base, a.work))
                oracle_partial(base, a.work).unlink(missing_ok=True)
            print("\n".join(section(res, a, model.cfg.num_layers)[-1:]), flush=True)
    print("\n".join(section(res, a, model.cfg.num_layers)))


if __name__ == "__main__":
    main()
