"""bench_compare.py's cells: choosing the layers, measuring a model, repairing it, each stored once.

A cell is one finished computation (a method's choice, a SLEB step, an evaluation, a tuning run, a latency
measurement) kept in the results JSON under a key that names the checkpoint's fingerprint and the settings
that produced it. `Bench.cell` returns the stored value or computes and stores it at once (atomically), so
an interrupted run loses at most the cell in progress; with `readonly` set a missing cell raises Missing
instead (writing the report computes nothing).
"""
import os
import shutil
import time

import torch

import baselines
import eval as ev
import gates
import importance
import latency
import load_weights
import save_weights
import tune
import zeroshot
from benchmarks import gate_cells
from benchmarks.common import load_cells, store_cell
from data import find_data_dir
from teacher import make_teacher, removed_kl, run_layers

METHODS = ["clp-gate", "exhaustive", "clp-gate-s2", "exhaustive-s2", "sleb", "shortened-ppl", "shortened-taylor", "block-influence", "angular",
           "tail", "random-0", "random-1", "random-2"]
# the order cells are computed in: CLP (the subject), then cheapest first, so a stopped run has whole columns
CHEAP_FIRST = ["clp-gate", "block-influence", "angular", "tail", "random-0", "random-1", "random-2", "shortened-taylor",
               "exhaustive", "clp-gate-s2", "shortened-ppl", "sleb", "exhaustive-s2"]
TASKS = "piqa,arc_easy,openbookqa,winogrande,arc_challenge,boolq"


def key(*parts):
    return "|".join(str(p) for p in parts)


class Missing(Exception):
    """A cell that is not stored, asked for while writing the report (nothing is computed then)."""


def contiguous(layers):
    return layers == list(range(layers[0], layers[0] + len(layers)))


# ---------------------------------------------------------------- choosing the layers (cached)

class Bench:
    """The dense model, lazily its calibration teacher, and the two result stores."""

    def __init__(self, a):
        self.a = a
        self.model, self.tok = load_weights.load(a.ckpt)
        self.L = self.model.cfg.num_layers
        self.fp = load_weights.fingerprint(self.model)["embed_sha256"]
        self.calib = f"{a.nsamples}x{a.seqlen}"
        self.res, self.gates = load_cells(a.results), load_cells(a.gate_results)
        self._teacher = None
        self.readonly = False

    @property
    def teacher(self):
        if self._teacher is None:
            self._teacher = make_teacher(self.model, self.tok, "wikitext2", self.a.nsamples, self.a.seqlen, self.a.seed)
        return self._teacher

    def path(self, store):
        return self.a.results if store is self.res else self.a.gate_results

    def refresh(self, store):
        """Add the cells that another run sharing the store's file has finished meanwhile."""
        store.update({c: v for c, v in load_cells(self.path(store)).items() if c not in store})

    def cell(self, k, compute, store=None):
        """The stored value under key k, or compute() stored at once (atomically) and returned."""
        store = self.res if store is None else store
        if k not in store and self.readonly:
            raise Missing(k)
        if k not in store:
            self.refresh(store)
        if k not in store:
            store_cell(self.path(store), store, k, compute())
        return store[k]


def choose(b, method, k):
    """{removed_layers, kl, seconds}: the method's choice at budget k with its calibration KL and search time."""
    m, t = b.model, lambda: b.teacher
    if method.startswith(("clp-gate", "exhaustive")):  # -s2: two segments; the gate's and oracle's cells are bench_gate.py's
        S = 2 if method.endswith("-s2") else 1
        base = gate_cells.key(b.fp, b.calib, b.a.seed, k, S)
        if method.startswith("clp-gate"):
            v = gate_cells.variant_for(S)
            g = b.cell(key(base, "gate", v), lambda: gate_cells.gate_cell(m, t(), k, S, b.a.seed, v, b.gates, base), b.gates)
            return {"removed_layers": g["removed_layers"], "kl": g["kl"], "seconds": g["seconds"]}
        o = b.cell(key(base, "oracle"), lambda: gate_cells.oracle_cell(m, t(), k, S, base, b.a.work), b.gates)
        gate_cells.oracle_partial(base, b.a.work).unlink(missing_ok=True)
        return {"removed_layers": o["ranked"][0][0], "kl": o["ranked"][0][1], "seconds": o["seconds"]}
    if method == "sleb":
        layers, seconds = sleb_prefix(b, k)
    elif method in ("shortened-ppl", "shortened-taylor"):
        s = b.cell(key(b.fp, b.calib, b.a.seed, method), lambda: timed_scores(method, m, t()))
        layers, seconds = importance.lowest(s["scores"], k), s["seconds"]
    else:
        c = b.cell(key(b.fp, b.calib, b.a.seed, k, method, "layers"), lambda: cheap_choice(method, m, t, k))
        layers, seconds = c["layers"], c["seconds"]
    kl = b.cell(key(b.fp, b.calib, b.a.seed, "kl", gates.span(layers)), lambda: removed_kl(m, t(), layers))
    return {"removed_layers": layers, "kl": kl, "seconds": seconds}


def cheap_choice(method, model, teacher, k):
    """Block influence, angular, tail, random-N: no model runs beyond the cached dense pass (not timed here)."""
    name, seed = (method[:6], int(method[7:])) if method.startswith("random-") else (method, 0)
    cached = teacher() if name in ("block-influence", "angular") else None
    t0 = time.perf_counter()
    layers = baselines.choose(name, model, cached, k, seed)[0]
    return {"layers": layers, "seconds": time.perf_counter() - t0}


def timed_scores(method, model, teacher):
    t0 = time.perf_counter()
    if method == "shortened-ppl":
        nll = importance.single_removal_nll(model, teacher, quiet=False)
        scores = [nll[i] for i in range(model.cfg.num_layers)]
    else:
        scores = importance.taylor_importance(model, teacher)
    return {"scores": scores, "seconds": time.perf_counter() - t0}


def sleb_prefix(b, k):
    """SLEB's first k removals (greedy, so every budget shares a prefix), one stored step at a time."""
    kk = key(b.fp, b.calib, b.a.seed, "sleb")
    run = b.res.get(kk, {"order": [], "nll": [], "seconds": []})
    if b.readonly and len(run["order"]) < k:
        raise Missing(kk)
    b.res[kk] = run
    while len(run["order"]) < k:
        t0 = time.perf_counter()
        order, nll = importance.sleb(b.model, b.teacher, len(run["order"]) + 1, start=run["order"])
        run["order"], run["nll"] = order, run["nll"] + nll
        run["seconds"].append(time.perf_counter() - t0)
        store_cell(b.a.results, b.res, kk, run)
    return sorted(run["order"][:k]), sum(run["seconds"][:k])


# ---------------------------------------------------------------- measuring (cached)

class DenseLogits:
    """eval.text_metrics' teacher: the dense logits of a ppl window from its cached last hidden state,
    so that every row's KL does not rerun the dense layers."""

    def __init__(self, dense, windows):
        self.dense = dense
        with torch.no_grad():
            self.h = {w.numpy().tobytes(): run_layers(dense, dense.embed_tokens(w[None]), 0) for w in windows}

    @torch.no_grad()
    def __call__(self, x):
        return self.dense.lm_head(self.dense.norm(self.h[x[0].numpy().tobytes()]))


def measure(b, model, teacher):
    """WikiText-2 ppl (and KL to the dense model) on the stated windows, zero-shot scores on the first --limit items."""
    m = ev.text_metrics(model, b.windows, teacher=teacher, label="ppl")
    row = {"ppl": m["ppl"], "kl": m.get("kl")}
    root = find_data_dir(b.a.data_dir)
    row["tasks"] = {t: zeroshot.run_task(model, b.tok, t, root, limit=b.a.limit) for t in b.tasks}
    return row


def eval_settings(b, full=False):
    """The part of an evaluation cell's key that names what was measured: the test subset and the tasks, or
    (full) perplexity alone on every WikiText-2 test window."""
    return "wt2[:all]|ppl-only" if full else f"wt2[:{b.a.ppl_windows}]|{','.join(b.tasks)}|limit{b.a.limit}"


def evaluate(b, removed, tuned=None, full=False, extra=None):
    """The evaluation cell of the dense model (removed = []), a pruned one, or a tuned checkpoint; with `full`
    only its perplexity on the whole WikiText-2 test set (the headline rows); `extra` is stored with a new cell."""
    k = key(b.fp, eval_settings(b, full), gates.span(removed) if removed else "dense", tuned or "untuned")
    if k in b.res:
        return b.res[k]
    if b.readonly:
        raise Missing(k)
    print(f"== evaluating {gates.span(removed) if removed else 'dense'} ({tuned or 'untuned'})"
          f"{' on the whole test set' if full else ''}", flush=True)
    if not removed:
        model, teacher = b.model, None
    else:
        model = b.model.without(removed) if tuned is None else load_weights.load(tuned_path(b, removed, tuned))[0]
        teacher = b.dense_logits
    if full:
        return b.cell(k, lambda: dict(ev.text_metrics(model, b.all_windows, label="ppl, whole test set"), **(extra or {})))
    return b.cell(k, lambda: dict(measure(b, model, teacher), **(extra or {})))


def speed(b, layer_counts):
    """Prefill and decode of the dense model and of models keeping each of `layer_counts` of its layers (which ones
    does not matter), all timed in the same interleaved rounds (latency.py): {n_layers: latency dict}."""
    counts = sorted(set(layer_counts) | {b.L}, reverse=True)
    head = key(b.fp, f"latency-interleaved{b.a.latency_seqlen}+{NEW_TOKENS}x{b.a.latency_runs}")
    k = key(head, ",".join(map(str, counts)))
    # a run over a subset of the ratios reuses a stored measurement that timed every depth it needs
    b.refresh(b.res)
    wider = [c for c in b.res if c.startswith(head + "|") and set(counts) <= {int(n) for n in c[len(head) + 1:].split(",")}]
    k = k if k in b.res or not wider else wider[0]

    def run():
        print(f"== latency: {', '.join(map(str, counts))} layers interleaved, {b.a.latency_runs} rounds", flush=True)
        models = {n: b.model.without(range(n, b.L)) for n in counts}
        out, bandwidth = latency.interleaved_latency(models, b.a.latency_seqlen, NEW_TOKENS, b.a.latency_runs, verbose=True)
        return {str(n): v for n, v in out.items()} | {"bandwidth": bandwidth, "load": os.getloadavg()[0]}
    return b.cell(k, run)


NEW_TOKENS = 32  # decode length of the latency measurement


# ---------------------------------------------------------------- repair (cached)

def variants(layers):
    """Repairs for a choice: endpoint tuning of every cut; for a non-contiguous choice also LoRA on all layers."""
    return ["endpoints"] if contiguous(layers) else ["endpoints", "lora-all"]


def tune_settings(b):
    return f"steps{b.a.steps}|bs{b.a.batch_size}|n{b.a.tune_nsamples}x{b.a.seqlen}"


def lora_rank(b, n_layers):
    """LoRA rank whose adapters on all n_layers hold as many parameters as two full layers (CLP's endpoints)."""
    layer = b.model.layers[0]
    full = sum(p.numel() for p in layer.parameters())
    per_rank = sum(lin.in_features + lin.out_features for lin in layer.modules() if isinstance(lin, torch.nn.Linear))
    return max(1, round(2 * full / (n_layers * per_rank)))


def work_dir(b, removed, variant=None, lr=None):
    name = f"pruned-{gates.span(removed).replace(',', '_')}"
    return b.a.work / (name if variant is None else f"{name}-{variant}-lr{lr:g}")


def tuned_path(b, removed, tag):
    variant, lr = tag.split("@")
    return work_dir(b, removed, variant, float(lr))


def tune_one(b, removed, variant, lr):
    """One tune.py run on the pruned checkpoint; its checkpoint stays in --work until the chosen one is evaluated."""
    pruned = work_dir(b, removed)
    if not (pruned / "config.json").is_file():
        save_weights.write_pruned(b.model, load_weights.resolve(b.a.ckpt), removed, pruned, {"method": "bench_compare"})
    out = work_dir(b, removed, variant, lr)
    rank = lora_rank(b, b.L - len(removed))
    rep = tune.run(pruned, out, train_layers="endpoints" if variant == "endpoints" else "all",
                    method="full" if variant == "endpoints" else "lora", rank=rank, alpha=2.0 * rank, steps=b.a.steps,
                    lr=lr, batch_size=b.a.batch_size, nsamples=b.a.tune_nsamples, seqlen=b.a.seqlen, log_every=10)
    return {"heldout_kl": rep["heldout_kl"], "trainable": rep["trainable_parameters"], "lr": lr,
            "tuned_layers": rep["tuned_source_layers"], "seconds": rep["wall_time_s"]["tuning"], "rank": rank}


def repaired(b, removed, variant, full=False):
    """The best-lr tuning run (lowest held-out KL) of one variant and its evaluation (`full`: see evaluate).

    Every lr is tuned once. A checkpoint is deleted once evaluated, so a new evaluation of a stored repair (the
    whole test set, or a run on another machine) tunes the chosen lr again, with the same seed and data, and
    stores the held-out KL it reaches beside the new figures: the check that it is the same model."""
    lrs = [float(x) for x in b.a.lrs.split(",")]
    tkey = {lr: key(b.fp, tune_settings(b), gates.span(removed), variant, f"lr{lr:g}") for lr in lrs}
    runs = {lr: b.cell(tkey[lr], lambda: tune_one(b, removed, variant, lr)) for lr in lrs}
    lr = min(runs, key=lambda x: runs[x]["heldout_kl"]["after"])
    tag, extra = f"{variant}@{lr:g}", None
    if not b.readonly and key(b.fp, eval_settings(b, full), gates.span(removed), tag) not in b.res \
            and not (work_dir(b, removed, variant, lr) / "config.json").is_file():
        again = tune_one(b, removed, variant, lr)
        extra = {"retuned_heldout_kl": again["heldout_kl"]["after"]}
        print(f"   tuned again: held-out KL {extra['retuned_heldout_kl']:.4f} (stored run: {runs[lr]['heldout_kl']['after']:.4f})")
    row = dict(evaluate(b, removed, tag, full, extra), tune=runs[lr], heldout_by_lr={f"{x:g}": r["heldout_kl"]["after"] for x, r in runs.items()})
    for x in runs:  # evaluated: the checkpoints can go
        shutil.rmtree(work_dir(b, removed, variant, x), ignore_errors=True)
    return dict(row, variant=variant, lr=lr)
