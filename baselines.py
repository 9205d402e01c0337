"""Other ways to choose the layers to remove, on the same cached calibration pass as the gate (teacher.py).

    python baselines.py --ckpt smollm2-135m --prune-layers 6 --method exhaustive --out runs/exhaustive-6

- exhaustive: every contiguous block of k layers, scored by the calibration KL with the block removed.
  This is the exact oracle the gate is checked against. Block [s, s+k) only runs layers s+k..L-1 from
  the cached dense state h[s], so all L-k+1 blocks cost about (L-k)/2 + 1 dense passes, not L-k+1.
- block-influence (ShortGPT, Men et al. 2024): BI_i = 1 - mean_t cos(h_i, h_{i+1}); remove the k layers
  with the lowest BI (not necessarily contiguous).
- angular (Gromov et al. 2024): d(s) = mean_t arccos(cos(h_s, h_{s+k})) / pi; remove the block [s, s+k)
  with the smallest d. The paper uses the last token of each sequence; we average over all calibration
  tokens, which is steadier with few windows.
- tail: the k layers just before the last one (the final layer is kept, as in Gromov et al.'s heuristic).
- random: a seeded random contiguous block.
- sleb, shortened-ppl, shortened-taylor: SLEB (Song et al. 2024) and Shortened-LLaMA's perplexity and
  Taylor importance (Kim et al. 2024), single layers scored on the calibration windows (importance.py).
- exhaustive_segments (no CLI method; bench_gate.py): every placement of S non-overlapping blocks with the
  gate's widths, the oracle for --segments 2.
Every method reports the calibration KL of its choice, so all are compared on one scale.
"""
import argparse
import itertools
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import importance
import load_weights
from gates import blocks_to_layers, budget, layers_to_blocks, segment_widths, span
from machinery import atomic, devices, placement, plan
from machinery.atomic import write_json
from machinery.devices import peak_memory
from machinery.errors import UserError, at_least, cli
from machinery.resume import OFF, Scores
from teacher import eta, log_probs, make_teacher, removed_kl, run_windows, token_kl

METHODS = ["exhaustive", "block-influence", "angular", "tail", "random", "sleb", "shortened-ppl", "shortened-taylor"]


def exhaustive(model, teacher, k, quiet=False, done=OFF):
    """Calibration KL of every contiguous block of k layers: [{"removed_layers", "kl"}], best first.
    `done` (resume.Scores) keeps each finished block's KL, and gives back those an interrupted run left."""
    L = model.cfg.num_layers
    scores, t0 = [], time.perf_counter()
    for s in range(L - k + 1):
        kl = done.get(f"{s}-{s + k - 1}", lambda: removed_kl(model, teacher, range(s, s + k)))
        scores.append({"removed_layers": list(range(s, s + k)), "kl": kl})
        if not quiet:
            print(f"  block {s:3d}-{s + k - 1:<3d} kl {kl:.5f}   ({s + 1}/{L - k + 1}, {eta(t0, s + 1, L - k + 1)})", flush=True)
    return sorted(scores, key=lambda c: c["kl"])


def placements(L, widths):
    """Every distinct removed-layer set made of blocks of these widths, in any order, not overlapping, inside [0, L).

    Blocks may touch; touching blocks make one longer block, and a layer set reached by several orders counts once.
    For two widths summing to k: m * C(L-k+1, 2) sets with a gap plus L-k+1 contiguous ones, m = 2 for unequal
    widths and 1 for equal ones.
    """
    out = set()
    for order in set(itertools.permutations(widths)):
        free = L - sum(order)  # layers left over, shared among the gaps before, between and after the blocks
        for gaps in itertools.product(range(free + 1), repeat=len(order)):
            if sum(gaps) <= free:
                s, blocks = 0, []
                for g, w in zip(gaps, order):
                    blocks.append((s + g, w))
                    s += g + w
                out.add(tuple(blocks_to_layers(blocks)))
    return sorted(out)


def exhaustive_segments(model, teacher, k, segments=2, quiet=False, done=OFF):
    """Calibration KL of every placement of `segments` blocks with the gate's widths: the S-segment oracle.
    `done` (resume.Scores) keeps each finished placement's KL, so an interrupted run scores only the rest."""
    sets = placements(model.cfg.num_layers, segment_widths(k, segments))
    kl = {s: done.scores[span(s)] for s in sets if span(s) in done.scores}
    todo = [s for s in sets if s not in kl]
    save = lambda layers, v, seconds: done.put(span(layers), v, seconds)  # noqa: E731
    kl |= dict(zip(todo, score_placements(model, teacher, todo, quiet=quiet, on_score=save)))
    return sorted(({"removed_layers": list(s), "kl": kl[s]} for s in sets), key=lambda c: c["kl"])


@torch.no_grad()
def score_placements(model, teacher, sets, batch=4, chunk=1024, quiet=False, max_cache=2 ** 30, on_score=None):
    """teacher.removed_kl of every layer set in `sets`, computed with less work and the same numbers.

    Placements that share their leading blocks share the states between them: the states entering layer p with
    the leading blocks removed are carried forward one layer at a time (sets are visited in order of their last
    block), so only each placement's tail, from its last block to the end, runs afresh. The teacher's log-probs
    are made once and kept when they take at most `max_cache` bytes (4 N T V). Every operation is the one
    removed_kl does, on the same batches and chunks, so the KLs are identical to it. on_score(set, kl, seconds)
    is called as each one finishes (seconds: since the previous one)."""
    L = model.cfg.num_layers
    finals = [th.reshape(-1, th.shape[-1]) for th in teacher.final.split(batch)]
    keep = 4 * teacher.num_tokens * model.cfg.vocab_size <= max_cache
    tl = {}

    def teacher_logp(b, j):
        if (b, j) in tl:
            return tl[b, j]
        out = log_probs(model, finals[b][j: j + chunk].to(model.norm.weight.device))
        if keep:
            tl[b, j] = out
        return out

    carried = {}  # leading blocks -> (p, states entering layer p with those blocks removed)

    def state_at(lead, p):
        if not lead:
            return list(teacher.hidden[p].split(batch))
        pos, xs = carried.get(lead, (None, None))
        if pos is None or pos > p:
            a, w = lead[-1]
            pos, xs = a + w, state_at(lead[:-1], a)
        xs = run_windows(model, xs, pos, p)
        carried[lead] = (p, xs)
        return xs

    order = sorted(range(len(sets)), key=lambda n: layers_to_blocks(sorted(sets[n])))
    out, t0 = [None] * len(sets), time.perf_counter()
    last = t0
    for m, n in enumerate(order):
        blocks = tuple(layers_to_blocks(sorted(sets[n])))
        a, w = blocks[-1]
        xs = run_windows(model, state_at(blocks[:-1], a), a + w, L)
        total = 0.0
        for b, x in enumerate(xs):
            h = x.reshape(-1, x.shape[-1])
            total += sum(float(token_kl(model, h[j: j + chunk], teacher_logp(b, j).to(h.device)).sum())
                         for j in range(0, len(h), chunk))
        out[n] = total / teacher.num_tokens
        if on_score is not None:
            t1 = time.perf_counter()
            on_score(sets[n], out[n], t1 - last)
            last = t1
        if not quiet and (m + 1) % 25 == 0:
            print(f"  {m + 1}/{len(sets)} placements  ({eta(t0, m + 1, len(sets))})", flush=True)
    return out


def mean_cosine(x, y):
    """Mean over tokens of cos(x_t, y_t), in fp32, for (N, T, C) hidden states."""
    # on several devices h[i] and h[i+1] can sit on two of them
    return float(F.cosine_similarity(x.float(), y.to(x.device).float(), dim=-1).mean())


def block_influence(teacher):
    """ShortGPT's Block Influence of every layer: 1 - mean cos(input, output)."""
    h = teacher.hidden
    return [1 - mean_cosine(h[i], h[i + 1]) for i in range(len(h) - 1)]


def angular_distance(teacher, k):
    """Gromov et al.'s angular distance between the input of layer s and of layer s+k, for every s."""
    h = teacher.hidden
    return [math.acos(max(-1.0, min(1.0, mean_cosine(h[s], h[s + k])))) / math.pi for s in range(len(h) - k)]


def choose(method, model, teacher, k, seed=0, done=OFF):
    """(removed layers, scores) for one method."""
    L = model.cfg.num_layers
    if method == "exhaustive":
        ranked = exhaustive(model, teacher, k, done=done)
        return ranked[0]["removed_layers"], ranked
    if method == "block-influence":
        bi = block_influence(teacher)
        return sorted(sorted(range(L), key=lambda i: bi[i])[:k]), bi
    if method == "angular":
        d = angular_distance(teacher, k)
        s = min(range(len(d)), key=lambda i: d[i])
        return list(range(s, s + k)), d
    if method == "tail":
        return list(range(L - 1 - k, L - 1)), None
    if method == "random":
        s = random.Random(seed).randrange(L - k + 1)
        return list(range(s, s + k)), None
    if method == "sleb":
        order, trace = importance.sleb(model, teacher, k)
        return sorted(order), {"order": order, "nll": trace}
    if method == "shortened-ppl":
        return importance.shortened_ppl(model, teacher, k)
    if method == "shortened-taylor":
        scores = importance.taylor_importance(model, teacher)
        return importance.lowest(scores, k), scores
    raise UserError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")


def run(ckpt, method, out, prune_layers=None, prune_ratio=None, calib="wikitext2", nsamples=16, seqlen=256, seed=0,
        device=None, dtype=None, devices=None, offload=False, cache_on_cpu=False):
    """baselines.py as a function: one method, one report.json in search.py's schema."""
    t0 = time.perf_counter()
    # what the flags and config.json can tell, before the model loads
    L = placement.config(ckpt).num_layers
    k = budget(L, prune_layers, prune_ratio)
    at_least(1, nsamples=nsamples, seqlen=seqlen)
    atomic.check_out(out, {"--ckpt": None if placement.is_random(ckpt) else load_weights.resolve(ckpt)}, "--out",
                     kind="directory")
    model, tokenizer, devs, dt = placement.load_placed(ckpt, device, dtype, devices, offload, seed)
    teacher = make_teacher(model, tokenizer, calib, nsamples, seqlen, seed, "cpu" if cache_on_cpu else None)
    t1 = time.perf_counter()
    done = Scores(Path(out) / "scores.json", {"method": method, "layers": k, "calibration": teacher.description,
                                               "model": load_weights.fingerprint(model)})
    removed, scores = choose(method, model, teacher, k, seed, done)
    kl = scores[0]["kl"] if method == "exhaustive" else removed_kl(model, teacher, removed)
    t2 = time.perf_counter()
    print(f"{method}: layers {span(removed)}  calibration KL {kl:.5f}  ({t2 - t1:.1f} s)")
    report = {"method": method, "removed_layers": removed, "kept_layers": [i for i in range(L) if i not in removed],
              "block": span(removed), "kl": kl, "scores": scores,
              "model": {"ckpt": str(ckpt), "fingerprint": load_weights.fingerprint(model),
                        "path": model.random_source if placement.is_random(ckpt) else str(load_weights.resolve(ckpt))},
              "budget": {"layers": k, "ratio": round(k / L, 4)}, "calibration": teacher.description,
              "settings": {"nsamples": nsamples, "seqlen": seqlen, "seed": seed, "calib": calib,
                           "placement": placement.describe_split(model)}, "seed": seed,
              "wall_time_s": {"load_and_teacher": round(t1 - t0, 2), "method": round(t2 - t1, 2)},
              **atomic.provenance(seed)}
    report["peak_memory_bytes"] = peak_memory(devs)
    write_json(Path(out) / "report.json", placement.mark_random(report, ckpt))
    return report


def memory_plan(a, cfg, path, placed):
    """baselines.py's flags -> memory.py's plan of scoring removed layers on a cached teacher (plan.py calls it)."""
    return plan.search_plan(placed, a.get("prune_layers"), a.get("prune_ratio"), a["nsamples"], a["seqlen"],
                            gate=False, method=a["method"], cache_on_cpu=bool(a.get("cache_on_cpu")))


def build_parser():
    """The command line, built without running anything (tests/test_docs.py reads its flags)."""
    p = argparse.ArgumentParser(description="Choose layers to remove with a baseline method (same report as search.py).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=load_weights.DEFAULT, help="checkpoint directory or short name")
    p.add_argument("--method", default="exhaustive", choices=METHODS, help="how to choose the layers")
    p.add_argument("--prune-ratio", type=float, default=None, help="fraction of layers to remove, k = round(ratio * L)")
    p.add_argument("--prune-layers", type=int, default=None, help="number of layers k to remove")
    p.add_argument("--calib", default="wikitext2", help="calibration text: wikitext2 (valid split), pydoc, or a text file")
    p.add_argument("--nsamples", type=int, default=16, help="number of calibration windows")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (and of the random block)")
    devices.add_arguments(p)
    p.add_argument("--cache-on-cpu", action="store_true", help="keep the teacher's cached states in CPU memory (pinned) while computing on a GPU")
    p.add_argument("--out", type=Path, default=Path("runs/baseline"), help="directory for report.json")
    plan.add_args(p)
    return p


@cli(memory="--nsamples or --seqlen", resume="the finished blocks' scores are kept in --out/scores.json; the same command continues from them")
def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if a.prune_layers is not None and a.prune_ratio is not None:
        p.error("give exactly one of --prune-ratio and --prune-layers")
    plan.check(a, "baselines", memory_plan)  # a dry-run needs no budget
    if a.prune_layers is None and a.prune_ratio is None:
        p.error("give exactly one of --prune-ratio and --prune-layers")
    run(**vars(a))


if __name__ == "__main__":
    main()
