"""The cells of the gate benchmark: one oracle ranking, or one gate run, stored under a key naming the model,
the calibration draw, the budget and the settings; shared by bench_gate.py and bench_compare.py.

Stored gate runs name the version of the search that made them (docs/design.md tells the history): v1 read off
the survivors' blocks only (replayed on v2's runs, replay_v1); v2 also scored every visited block; v3 added the
merge moves; v4 to v7 added the reshaping rounds one by one. search.py runs v7 (CURRENT); the older rounds are
kept here, by name, to reproduce and continue the stored rows.
"""
import time
from pathlib import Path

import baselines
import gates
import search
from benchmarks.common import ROOT
from machinery.resume import OFF, Scores

# reshaping moves by the names stored rows use: boundary moves alone (v4), search.shifts (v5), search.splits (v6)
MOVES = {"widths": gates.boundary_moves, "anywhere": search.shifts, "swaps": search.splits}
# variant: (merge moves in the read-off walk, reshaping rounds as (moves name, beam)); v2 had no merge moves
HISTORY = {"v3": (True, ()), "v4": (True, (("widths", 1),)), "v5": (True, (("anywhere", 1),)),
           "v6": (True, (("anywhere", 1), ("swaps", 1))), "v7": (True, (("anywhere", 1), ("swaps", 1), ("swaps", 2)))}
CURRENT = "v7"  # search.RESHAPE (tests/test_bench_compare.py checks that they agree)


def rounds(walks):
    """search.reshape's rounds for named ones."""
    return tuple((MOVES[name], beam) for name, beam in walks)


RESULTS = ROOT / "benchmarks" / "results" / "gate.json"


def key(*parts):
    return "|".join(str(p) for p in parts)


def variant_for(segments, variant=CURRENT):
    """The name a gate cell is stored under: v2 to v7 differ only in multi-segment walks, so a one-segment run of
    any of them is the stored v2 run."""
    return "v2" if segments == 1 else variant


def oracle(model, teacher, k, segments, done=OFF):
    """The exact ranking of every placement, best first, and its wall time. With `done` (resume.Scores) each
    finished placement is kept as it is scored, an interrupted run continues where it stopped, and the time is
    the sum of the scoring times of every run that contributed."""
    t0 = time.perf_counter()
    ranked = baselines.exhaustive(model, teacher, k, done=done) if segments == 1 else \
        baselines.exhaustive_segments(model, teacher, k, segments, done=done)
    seconds = time.perf_counter() - t0 if done is OFF else done.seconds
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


def gate_run(model, teacher, k, segments, seed, variant=CURRENT):
    """One run of search.py's search with the reshaping rounds of `variant` (v2 to v7 are the same for S = 1)."""
    if segments > 1 and variant not in HISTORY:
        raise ValueError(f"{variant} with {segments} segments: search.py always merges now; its stored cells stay")
    t0 = time.perf_counter()
    g = search.search(model, teacher, k, segments=segments, seed=seed, log_every=10,
                      rounds=rounds(HISTORY[variant][1]) if segments > 1 else ())
    return {"removed_layers": g["removed_layers"], "kl": g["kl"], "seconds": time.perf_counter() - t0,
            "scored": len(g["candidates"]), "time_s": g["time_s"], "survivors": g["survivors"],
            "candidates": [[c["removed_layers"], c["kl"]] for c in g["candidates"]],
            "read": [c["removed_layers"] for c in g["candidates"] if c["read_off_by_starts"]]}


def gate_cell(model, teacher, k, segments, seed, variant, res, base):
    """The stored form of one gate run: a variant with a second walk continues the longest stored run under `base`
    whose walks begin its own (v4, v5: v3's; v6: v5's, else v3's; v7: v6's, ...) when there is one."""
    v = variant_for(segments, variant)
    prior, walks = stored_prefix(v, res, base) if segments > 1 else (None, None)
    run = continue_run(model, teacher, prior, segments, walks) if prior else \
        gate_run(model, teacher, k, segments, seed, v)
    return dict(run, kind="gate", S=segments, k=k, seed=seed, variant=v, oracle_key=key(base, "oracle"))


def stored_prefix(v, res, base):
    """(stored run, the rounds still to do) for variant v: the stored variant with the same merge whose reshaping
    rounds are the longest prefix of v's, or (None, None)."""
    merge, walks = HISTORY[v]
    for n in range(len(walks) - 1, -1, -1):
        for name, (m, w) in HISTORY.items():
            if m == merge and w == walks[:n] and key(base, "gate", name) in res:
                return dict(res[key(base, "gate", name)], continued_from=name), walks[n:]
    return None, None


def continue_run(model, teacher, prior, segments, walks=(("widths", 1),)):
    """A run that continues a stored one of the same budget and seed whose gate steps and walks are its first ones
    (the same seed, the same numbers): the stored scored placements, continued by the remaining reshaping rounds
    `walks` (named, see MOVES); the time is the stored run's plus theirs."""
    t0 = time.perf_counter()
    scored = {tuple(gates.layers_to_blocks(layers)): kl for layers, kl in prior["candidates"]}
    search.reshape(model, teacher, scored, model.cfg.num_layers, segments, rounds(walks))
    dt = time.perf_counter() - t0
    ranked = sorted(([gates.blocks_to_layers(b), kl] for b, kl in scored.items()), key=lambda c: c[1])
    return dict(prior, removed_layers=ranked[0][0], kl=ranked[0][1], seconds=prior["seconds"] + dt, scored=len(ranked),
                time_s=dict(prior["time_s"], **{"walk_" + "_".join(f"{m}{b}" for m, b in walks): dt}), candidates=ranked,
                continued_from=prior.get("continued_from", "v3"))


def replay_v1(read, orc, L, k):
    """v1's choice from the same gate steps: the walk from the survivors' blocks alone, on the oracle's exact KLs
    (one segment: the walk is a deterministic function of its start blocks and the KL landscape)."""
    kl = {tuple(layers): v for layers, v in orc["ranked"]}
    score = lambda blocks: kl[tuple(gates.blocks_to_layers(blocks))]  # noqa: E731
    scored, expanded, frontier = {}, set(), {((r[0], k),) for r in read}
    while frontier:
        for blocks in set().union(*(gates.neighbours(f, L, 1) for f in frontier)) - set(scored):
            scored[blocks] = score(blocks)
        expanded |= frontier
        best = min(scored, key=scored.get)
        frontier = set() if best in expanded else {best}
    return {"removed_layers": gates.blocks_to_layers(best), "kl": scored[best], "scored": len(scored)}


def regret_row(gate, orc):
    """Rank of the gate's choice among all placements and its KL above the optimum."""
    layers = [r[0] for r in orc["ranked"]]
    rank = layers.index(gate["removed_layers"]) + 1 if gate["removed_layers"] in layers else None
    best = orc["ranked"][0]
    return {"rank": rank, "of": len(layers), "best": best[0], "best_kl": best[1],
            "regret": gate["kl"] - best[1], "rel": gate["kl"] / best[1] - 1}
