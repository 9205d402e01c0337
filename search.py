"""Continuous layer pruning search: train the concave gate (gates.py) against the dense model, read off a block.

    python search.py --ckpt smollm2-135m --prune-ratio 0.2 --out runs/clp-20
    python search.py --ckpt smollm2-135m --prune-layers 6 --excise runs/smollm2-pruned
    python search.py --ckpt llama2-70b --prune-ratio 0.3 --devices cuda:0,cuda:1     # placement.py, devices.py

Teacher-student (our design, docs/design.md "The gate"): the teacher is the same weights with every gate
open, run once under no_grad and cached (teacher.py). The student is the model with the soft keep
weights of the gate; the loss is KL(p_teacher || p_student) averaged over calibration tokens, and Adam
updates only the gate centres mu (the model's weights are frozen and get no gradients). tau anneals
from 2 layers to 0.05 and the Adam step shrinks with it. Several starts spread over depth guard
against poor basins; after each third of the steps the worse half of them stops (successive
halving). At the end the surviving starts' rounded blocks and their neighbours are scored by their
exact (discrete) calibration KL, stepping on to the best block's neighbours until it is a local
minimum: the relaxed gate often settles between two adjacent blocks, and rounding alone can pick
the worse one. Before the walk, every block a start's rounded window passed through (stopped starts
included) is scored exactly too. With --segments 2 or more, a reshaping walk over exact KLs follows
(RESHAPE), so the blocks may change widths, move, or split. docs/design.md tells how each piece came
to be, with the measurements.
"""
import argparse
import inspect
import math
import sys
import time
from pathlib import Path

import torch

import load_weights
from gates import (ContiguousGate, blocks_to_layers, boundary_moves, budget, halving_cuts, initial_centres, layers_to_blocks,
                   neighbours, place_segments, relocations, segment_widths, span, start_steps, strip, swaps, tau_at)
from machinery import atomic, devices, placement, plan
from machinery.atomic import write_json
from machinery.devices import peak_memory
from machinery.errors import UserError, at_least, cli, old_spelling
from machinery.resume import OFF, GateState
from save_weights import info_from_report, write_pruned
from teacher import eta, kl_backward, make_teacher, removed_kl, run_layers

# The reshaping walk that follows the read-off when the gate has two or more segments: rounds of (moves, beam).
# The gate's segments have fixed widths and stay in their own part of the depth; the cheapest blocks need not.
# Round 1 moves an end layer of a block to just outside one (widths change) or a whole block anywhere it fits;
# round 2 also swaps any removed layer for a kept one, so a block can split; round 3 goes on until the two best
# placements are expanded, stepping over one placement uphill. docs/design.md has the measurements behind each.
def shifts(layers, L, segments):
    """Boundary moves and relocations (gates.py): the blocks change width or place, at most `segments` of them."""
    return boundary_moves(layers, L, segments) | relocations(layers, L)


def splits(layers, L, segments):
    """Swaps (a removed layer for a kept one: a block can split) and relocations, at most `segments` blocks."""
    return swaps(layers, L, segments) | relocations(layers, L)


RESHAPE = ((shifts, 1), (splits, 1), (splits, 2))


def first_gated_layer(keep, eps=1e-4):
    """The first layer whose keep weight differs from 1 by more than eps: earlier layers are the dense ones."""
    gated = (1 - keep.detach()).abs() > eps
    return int(gated.nonzero()[0]) if gated.any() else len(keep) - 1


def gate_loss(model, teacher, gate, tau, idx, chunk):
    """KL of the gated student on calibration windows idx; backpropagates into gate.mu, returns the loss."""
    keep = gate.keep(tau)  # (L,)
    # layers before the first gated one are (to 1e-4) the dense ones: start from their cached output
    first = first_gated_layer(keep)
    h = run_layers(model, teacher.hidden[first][idx], first, keep=keep)
    return kl_backward(model, h, teacher.final[idx], chunk)


def minibatches(num_windows, steps, batch_size, seed):
    """Window indices for each step: a seeded shuffle of the calibration windows, cycled."""
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(num_windows, generator=g) for _ in range(steps * batch_size // num_windows + 1)])
    return order[: steps * batch_size].view(steps, batch_size)


def make_gates(L, k, segments, starts):
    widths = segment_widths(k, segments)
    return [ContiguousGate(L, k, segments, initial_centres(L, widths, r, starts)) for r in range(starts)]


def train_gates(model, teacher, gates, steps, batch_size, lr, tau0, tau1, seed, chunk, log_every, halving, state=OFF):
    """Adam on the centres of every start, same minibatch for all; returns (trajectory, surviving starts).
    `state` (resume.GateState) saves the loop every few steps and restores it on --resume."""
    opt = torch.optim.Adam([g.mu for g in gates], lr=lr)
    batches = minibatches(len(teacher.tokens), steps, batch_size, seed)
    cuts = halving_cuts(steps, halving)
    active, since = list(range(len(gates))), 0
    work = start_steps(len(gates), steps, halving)  # start-steps done after each step, for an honest time left
    first, active, since, trajectory = state.restore(gates, opt)
    t0 = time.perf_counter()
    for step in range(first, steps):
        tau = tau_at(step, steps, tau0, tau1)
        # the step in layers shrinks with the softness of the window
        for group in opt.param_groups:
            group["lr"] = lr * tau / tau0
        opt.zero_grad()  # stopped starts keep grad None, so Adam leaves them alone
        losses = {r: gate_loss(model, teacher, gates[r], tau, batches[step], chunk) for r in active}
        for r, v in losses.items():
            if not math.isfinite(v):
                raise FloatingPointError(f"the gate loss of start {r} became {v} at step {step + 1}: nothing was "
                                         f"written; check the checkpoint's weights or lower --lr (now {lr:g})")
        trajectory.append({"step": step, "tau": round(tau, 4), "kl": {r: round(v, 5) for r, v in losses.items()},
                           "mu": {r: [round(m, 3) for m in gates[r].mu.tolist()] for r in active}})
        opt.step()
        for g in gates:
            g.clamp_()
        if step % log_every == 0 or step == steps - 1:
            log_step(step, steps, tau, losses, gates, eta(t0, work[step], work[-1], 'start-step'))
        if step + 1 in cuts and len(active) > 1:
            active, since = halve(trajectory[since:], active), step + 1
        state.after_step(step, steps, gates, opt, active, since, trajectory)
    return trajectory, active


def halve(recent, active):
    """Successive halving: the better half of the starts by mean KL since the last cut (same minibatches) go on."""
    mean = {r: sum(t["kl"][r] for t in recent) / len(recent) for r in active}
    keep = sorted(active, key=mean.get)[: (len(active) + 1) // 2]
    print("halving: " + ", ".join(f"start {r} {'goes on' if r in keep else 'stops'} (mean kl {mean[r]:.4f})" for r in active))
    return sorted(keep)


def log_step(step, steps, tau, losses, gates, time_left):
    print(f"step {step + 1:3d}/{steps}  tau {tau:.3f}  {len(losses)} start(s)  {time_left}")
    for r, loss in losses.items():
        print(f"  start {r}  kl {loss:.4f}  block {gates[r].describe():>11s}  {strip(gates[r].keep(tau))}")
    sys.stdout.flush()


def visited_blocks(trajectory, widths, L):
    """Every distinct discrete placement that some start's rounded window passed through, stopped starts included."""
    out = set()
    for t in trajectory:
        for mu in t["mu"].values():
            out.add(place_segments([math.floor(m - w / 2 + 0.5) for m, w in zip(mu, widths)], widths, L))
    return out


def choose_block(model, teacher, gates, L, radius=1, seeds=(), state=OFF, merge=True, rounds=RESHAPE):
    """Discrete read-off: score each surviving start's block and its neighbours by the exact calibration KL with
    the layers removed, then keep stepping to the best block's neighbours until the best one has all its
    neighbours scored (a local minimum of the discrete KL). `gates` is {start: gate}; `seeds`, the placements
    the starts visited, are scored first (without their neighbours). With two or more segments, the reshaping
    walk (`rounds`, see RESHAPE) follows. Returns every scored placement, best first.

    Why seeds: the relaxed gate sees the KL landscape smoothed over about tau layers and prefers a wide basin to a
    narrow deeper one; a start can cross the optimum on its way and be stopped by halving. Why merge: with two
    segments the gate keeps the blocks apart, so a move that puts one block next to another (2 S (S - 1) more
    neighbours per step) lets the walk reach a contiguous placement."""
    read = {g.blocks(): [r for r, h in gates.items() if h.blocks() == g.blocks()] for g in gates.values()}
    seeds = set(seeds) - set(read)
    print(f"read-off: {len(read)} distinct block(s) from the surviving starts, {len(seeds)} more visited; "
          f"scoring them, and the neighbours of the best")
    scored, expanded, frontier = {}, set(), set(read)
    for blocks in sorted(seeds):
        scored[blocks] = state.score(blocks, lambda: removed_kl(model, teacher, blocks_to_layers(blocks)))
        print(f"  {span(blocks_to_layers(blocks)):>12s}  kl {scored[blocks]:.5f}  (visited)", flush=True)
    while frontier:
        for blocks in sorted(set().union(*(neighbours(b, L, radius, merge) for b in frontier)) - set(scored)):
            scored[blocks] = state.score(blocks, lambda: removed_kl(model, teacher, blocks_to_layers(blocks)))
            note = f"read off by start(s) {read[blocks]}" if blocks in read else "neighbour"
            print(f"  {span(blocks_to_layers(blocks)):>12s}  kl {scored[blocks]:.5f}  ({note})", flush=True)
        expanded |= frontier
        best = min(scored, key=scored.get)
        frontier = set() if best in expanded else {best}
    S = len(next(iter(gates.values())).widths)
    if S > 1:
        reshape(model, teacher, scored, L, S, rounds, state)
    return sorted(({"removed_layers": blocks_to_layers(b), "kl": kl, "read_off_by_starts": read.get(b, [])}
                   for b, kl in scored.items()), key=lambda c: c["kl"])


def reshape(model, teacher, scored, L, segments, rounds=RESHAPE, state=OFF):
    """The reshaping walk: for each round (moves, beam), from the best scored placement, score its moves until
    the `beam` best placements have all theirs scored (beam 1: a local minimum; beam 2 may step over one
    placement uphill of the best). Adds to `scored` ({blocks: kl}); a layer set already scored under another
    split into blocks is not scored again."""
    by_layers = {tuple(blocks_to_layers(b)): kl for b, kl in scored.items()}
    for moves, beam in rounds:
        expanded = set()
        while todo := [ls for ls in sorted(by_layers, key=by_layers.get)[:beam] if ls not in expanded]:
            expanded.add(todo[0])
            for moved in sorted(moves(todo[0], L, segments) - set(by_layers)):
                blocks = tuple(layers_to_blocks(moved))
                scored[blocks] = by_layers[moved] = state.score(blocks, lambda: removed_kl(model, teacher, list(moved)))
                print(f"  {span(list(moved)):>12s}  kl {scored[blocks]:.5f}  ({moves.__name__})", flush=True)


def search(model, teacher, k, segments=1, starts=4, steps=30, batch_size=1, lr=1.0, tau0=2.0, tau1=0.05,
           radius=1, halving=True, seed=0, kl_chunk=1024, log_every=1, state=OFF, rounds=RESHAPE):
    """The CLP gate search on a cached teacher; returns a dict with the chosen block and how it was found.
    `state` (resume.GateState) keeps the loop and the exact scores of an interrupted run."""
    torch.manual_seed(seed)
    gates = make_gates(model.cfg.num_layers, k, segments, starts)
    t0 = time.perf_counter()
    trajectory, active = train_gates(model, teacher, gates, steps, batch_size, lr, tau0, tau1, seed, kl_chunk,
                                     log_every, halving, state)
    t1 = time.perf_counter()
    L = model.cfg.num_layers
    seeds = visited_blocks(trajectory, gates[0].widths, L)
    candidates = choose_block(model, teacher, {r: gates[r] for r in active}, L, radius, seeds, state, rounds=rounds)
    t2 = time.perf_counter()
    best = candidates[0]
    return {"removed_layers": best["removed_layers"], "kl": best["kl"], "candidates": candidates,
            "trajectory": trajectory, "final_mu": [g.mu.tolist() for g in gates], "survivors": active,
            "time_s": {"gate_steps": t1 - t0, "read_off": t2 - t1}}


def check_settings(k, **settings):
    """Clear errors, naming the flag, for search settings that cannot work; `settings` as search() takes them."""
    s = {name: p.default for name, p in inspect.signature(search).parameters.items()
         if p.default is not inspect.Parameter.empty} | settings
    at_least(1, **{name: s.get(name) for name in ("starts", "steps", "batch_size", "nsamples", "seqlen", "kl_chunk")})
    for name in ("lr", "tau0", "tau1"):
        if not s[name] > 0:
            raise UserError(f"--{name} {s[name]} must be positive (the gate temperature and step divide by it)")
    if s["radius"] < 0:
        raise UserError(f"--radius {s['radius']} must be at least 0")
    if not 1 <= s["segments"] <= k:
        raise UserError(f"--segments {s['segments']} must be between 1 and the {k} layer(s) to remove "
                        f"(--prune-layers / --prune-ratio): each segment removes at least one layer")


def run(ckpt, out, prune_layers=None, prune_ratio=None, calib="wikitext2", nsamples=16, seqlen=256, seed=0,
        device=None, dtype=None, devices=None, offload=False, cache_on_cpu=False, excise_to=None, save_every=0,
        resume=False, **gate):
    """search.py as a function: load, cache the teacher, search, write report.json (and the pruned checkpoint).

    `gate` holds search()'s settings (segments, starts, steps, batch_size, lr, tau0, tau1, radius, halving, ...).
    """
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()
                if k not in ("gate", "save_every", "resume")} | gate
    t0 = time.perf_counter()
    if excise_to is not None:
        placement.refuse_random(ckpt, "--ckpt", "there is nothing to excise")
    # everything that can be checked from the flags and config.json, before the model loads
    L = placement.config(ckpt).num_layers
    k = budget(L, prune_layers, prune_ratio)
    check_settings(k, nsamples=nsamples, seqlen=seqlen, **gate)
    source = None if placement.is_random(ckpt) else load_weights.resolve(ckpt)
    atomic.check_out(out, {"--ckpt": source}, "--out", kind="directory")
    atomic.check_out(excise_to, {"--ckpt": source, "--out": out}, "--excise", inside_ok=("--out",))
    model, tokenizer, devs, dt = placement.load_placed(ckpt, device, dtype, devices, offload, seed)
    settings["placement"] = placement.describe_split(model)
    if source is None:
        source = model.random_source
    teacher = make_teacher(model, tokenizer, calib, nsamples, seqlen, seed, "cpu" if cache_on_cpu else None)
    print(f"searching for {k} of {L} layers to remove with the gate ({gate})")
    t1 = time.perf_counter()
    state = OFF
    if save_every or resume:
        same = {key: v for key, v in settings.items() if key not in ("out", "excise_to", "log_every")}
        same |= {"model": load_weights.fingerprint(model)}
        state = GateState(Path(out) / "search_state.safetensors", save_every, same, resume)
    result = search(model, teacher, k, seed=seed, state=state, **gate)
    removed = result["removed_layers"]
    print(f"chosen block: layers {span(removed)}  (calibration KL {result['kl']:.5f})")
    report = {"method": "clp-gate", "removed_layers": removed, "kept_layers": [i for i in range(L) if i not in removed],
              "block": span(removed), "kl": result["kl"], "candidates": result["candidates"],
              "model": {"ckpt": str(ckpt), "path": str(source), "fingerprint": load_weights.fingerprint(model)},
              "budget": {"layers": k, "ratio": round(k / L, 4)}, "calibration": teacher.description,
              "settings": settings, "trajectory": result["trajectory"], "final_mu": result["final_mu"],
              "survivors": result["survivors"],
              "wall_time_s": {"load_and_teacher": round(t1 - t0, 2),
                              **{key: round(v, 2) for key, v in result["time_s"].items()},
                              "total": round(time.perf_counter() - t0, 2)},
              **atomic.provenance(seed)}
    report["peak_memory_bytes"] = peak_memory(devs)
    write_json(Path(out) / "report.json", placement.mark_random(report, ckpt))
    print("peak memory: " + ", ".join(f"{d} {b / 2**30:,.2f} GiB" for d, b in report["peak_memory_bytes"].items()))
    print(f"report: {Path(out) / 'report.json'}  (search {report['wall_time_s']['total']:.0f} s in all)")
    if excise_to is not None:
        write_pruned(load_weights.unrounded(model, source), source, removed, excise_to,
                     info_from_report(report, Path(out) / "report.json"))
        print(f"pruned checkpoint: {excise_to}")
    return report


def memory_plan(a, cfg, path, placed):
    """search.py's flags -> memory.py's plan of a gate search (plan.py calls it with the placement in `placed`)."""
    return plan.search_plan(placed, a.get("prune_layers"), a.get("prune_ratio"), a["nsamples"], a["seqlen"],
                            batch_size=a["batch_size"], chunk=a["kl_chunk"], steps=a["steps"], starts=a["starts"],
                            halving=a["halving"], radius=a["radius"], cache_on_cpu=bool(a.get("cache_on_cpu")))


def build_parser():
    """The command line, built without running anything (tests/test_docs.py reads its flags)."""
    p = argparse.ArgumentParser(description="Find the contiguous block of layers to remove with the CLP gate.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=load_weights.DEFAULT, help="checkpoint directory or short name")
    p.add_argument("--prune-ratio", type=float, default=None, help="fraction of layers to remove, k = round(ratio * L)")
    p.add_argument("--prune-layers", type=int, default=None, help="number of layers k to remove")
    p.add_argument("--calib", default="wikitext2", help="calibration text: wikitext2 (valid split), pydoc, or a text file")
    p.add_argument("--nsamples", type=int, default=16, help="number of calibration windows")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--steps", type=int, default=30, help="Adam steps on the gate")
    p.add_argument("--starts", type=int, default=4, help="gate starts spread evenly over depth")
    p.add_argument("--segments", type=int, default=1, help="contiguous segments per gate (1: one block)")
    p.add_argument("--batch-size", type=int, default=1, help="calibration windows per gate step")
    p.add_argument("--lr", type=float, default=1.0, help="Adam step in layers at tau0, shrinking in proportion to tau")
    p.add_argument("--tau0", type=float, default=2.0, help="initial gate temperature, in layers")
    p.add_argument("--tau1", type=float, default=0.05, help="final gate temperature, in layers")
    p.add_argument("--radius", type=int, default=1, help="neighbours of each read-off scored exactly, in layers")
    p.add_argument("--halving", action=argparse.BooleanOptionalAction, default=True,
                   help="after each third of the steps, stop the worse half of the starts")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows and minibatch order")
    p.add_argument("--kl-chunk", type=int, default=1024, help="tokens per chunk of the KL (bounds the tokens x vocab memory)")
    old_spelling(p, "--chunk", "--kl-chunk")
    p.add_argument("--log-every", type=int, default=1, help="print the gate every this many steps")
    devices.add_arguments(p)
    p.add_argument("--cache-on-cpu", action="store_true", help="keep the teacher's cached states in CPU memory (pinned) while computing on a GPU")
    p.add_argument("--out", type=Path, default=Path("runs/search"), help="directory for report.json")
    p.add_argument("--excise", type=Path, default=None, help="also write the pruned checkpoint to this directory")
    p.add_argument("--save-every", type=int, default=0, help="save the search state into --out every this many steps; 0: never")
    p.add_argument("--resume", action="store_true", help="continue from the state a run with --save-every left in --out")
    plan.add_args(p)
    p.add_argument("--plot", action="store_true", help="also draw gate.png and landscape.png into --out (plots.py)")
    return p


@cli(memory="--nsamples, --seqlen or --kl-chunk",
     resume="a run with --save-every N kept its state every N steps in --out; the same command with --resume continues it")
def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if a.prune_layers is not None and a.prune_ratio is not None:
        p.error("give exactly one of --prune-ratio and --prune-layers")
    plan.check(a, "search", memory_plan)  # a dry-run needs no budget
    if a.prune_layers is None and a.prune_ratio is None:
        p.error("give exactly one of --prune-ratio and --prune-layers")
    kwargs = vars(a)
    kwargs["excise_to"] = kwargs.pop("excise")
    plot = kwargs.pop("plot")
    run(**kwargs)
    if plot:
        import plots  # matplotlib only when asked for
        for path in plots.make_plots(a.out, search_report=a.out / "report.json"):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
