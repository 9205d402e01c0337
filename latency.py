"""Latency you can trust: models timed in turn (interleaved), medians with their spread, and decoding
measured against the machine's memory-bandwidth roofline.

Interleaved: on a shared machine the load drifts. Timing one model and then the other puts the drift on
one side (a 30 -> 24 layer decode was once measured 1.61x faster, above its ideal 1.25x). Here every
round times each model once, each round starting one model later than the last, after warm-up rounds;
a figure is the median over rounds,
reported with its min, max and interquartile range, and a speedup is a ratio of those medians.

Roofline: a batch-1 decode step reads every weight once and does about 2 flops per weight read, so its
speed is bounded by (bytes per second the memory delivers) / (weight bytes read per token). The bandwidth
is measured in the same rounds by a matrix-vector product over an fp32 matrix far larger than the caches;
the fraction of that bound a model reaches says how far it is from the physical limit.
"""
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from machinery.devices import peak_bytes, reset_peak

DECODE_PROMPT = 128  # tokens of prompt before the timed decode steps


def sync(device):
    # a model placed over several GPUs runs on all of them: wait for each
    if torch.device(device).type == "cuda":
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


@torch.no_grad()
def prefill_seconds(model, tokens, device="cpu"):
    sync(device)
    t0 = time.perf_counter()
    model(tokens)
    sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def greedy_decode(model, prompt, new_tokens, device="cpu", step=None, cache=None):
    """Greedy continuation with the static KV cache: (tokens (1, T + new_tokens), seconds of the decode steps).

    `step` replaces the model in the timed steps (a torch.compile'd model); a given `cache` is reset and reused.
    """
    if cache is None:
        cache = model.make_cache(1, prompt.shape[1] + new_tokens)
    tokens = model.greedy(prompt, cache, step)
    out = [prompt, next(tokens)]  # the prefill, not timed
    sync(device)
    t0 = time.perf_counter()
    out += [next(tokens) for _ in range(new_tokens)]  # new_tokens decode steps
    sync(device)
    return torch.cat(out[:-1], dim=1), time.perf_counter() - t0


# ---------------------------------------------------------------- memory

def resident(device):
    """Bytes the device holds now: CUDA allocation, or on CPU the process's resident set."""
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def model_bytes(model):
    """Bytes of every distinct parameter and buffer storage (a tied head counted once)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


# ---------------------------------------------------------------- the roofline

def weight_bytes_per_token(model):
    """Bytes one batch-1 decode step reads: every weight of the Blocks, the final norm and the head, and one
    embedding row (the whole matrix when it is also the head). A module with `bytes_read()` (a quantized
    Linear) reports what its own forward reads. The KV cache is not counted (about 2% at 256 positions here)."""
    quant = [m for m in model.modules() if hasattr(m, "bytes_read")]
    skip = {t.data_ptr() for m in quant for t in list(m.parameters()) + list(m.buffers())}
    skip.add(model.inv_freq.data_ptr())
    emb = model.embed_tokens.weight
    total = sum(m.bytes_read() for m in quant)
    if model.lm_head.weight is not emb:
        skip.add(emb.data_ptr())
        total += emb.shape[1] * emb.element_size()
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in skip and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class MatvecProbe:
    """y = W x with W an fp32 (n, n) matrix of about `mbytes` MiB: the rate at which this machine streams weights."""

    def __init__(self, mbytes=256, device="cpu"):
        n = max(32, int((mbytes * 2**20 / 4) ** 0.5))
        self.W = torch.full((n, n), 0.5, device=device)
        self.x = torch.full((1, n), 0.25, device=device)
        self.device = device
        self.bytes = self.W.numel() * 4

    @torch.no_grad()
    def seconds(self, tries=3):
        """The fastest of `tries` products: what the memory delivers when the process is not preempted."""
        best = float("inf")
        for _ in range(tries):
            sync(self.device)
            t0 = time.perf_counter()
            F.linear(self.x, self.W)
            sync(self.device)
            best = min(best, time.perf_counter() - t0)
        return best


# ---------------------------------------------------------------- interleaved rounds

def spread(xs):
    """Median, min, max and quartiles of a list of timings, with the runs themselves."""
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "q1": q1, "q3": q3, "n": len(xs),
            "runs": list(xs)}


def memory_pass(model, x, prompt, new_tokens, device, cache, step=None):
    """Peak memory of one prefill and one decode of `model`: its own weights + what the runs add on top.
    The process (or device) also holds the other models; only this model's part is reported."""
    before = resident(device)
    reset_peak(device)
    prefill_seconds(model, x, device)
    greedy_decode(model, prompt, new_tokens, device, step, cache)  # a compiled step compiles here, untimed
    peak, kind = peak_bytes(device)
    return model_bytes(model) + max(0, peak - before), f"weights + ({kind} during its runs - before them)"


def interleaved_latency(models, seqlen, new_tokens=128, runs=5, warmup=1, device="cpu", seed=0, probe_mbytes=256,
                        steps=None, more_prefill=(), verbose=False):
    """Prefill and decode timings of several models {name: model}, round-robin, with the bandwidth probe.

    Round 0 (untimed) measures each model's peak memory; then `warmup` untimed and `runs` timed rounds, each
    timing every model's prefill of `seqlen` tokens, its decode of `new_tokens` after a 128-token prompt, and the
    probe. `steps` {name: callable} replaces a model in its decode steps (torch.compile); `more_prefill` lists
    further prefill lengths timed in the same rounds ("prefill_more"). Returns ({name: latency dict}, bandwidth).
    """
    steps = steps or {}
    g = torch.Generator().manual_seed(seed)
    V = min(m.cfg.vocab_size for m in models.values())
    xl = torch.randint(V, (1, max([seqlen, *more_prefill])), generator=g).to(device)  # (1, longest T)
    x = xl[:, :seqlen]  # (1, T)
    prompt = x[:, :min(DECODE_PROMPT, seqlen)]
    caches = {k: m.make_cache(1, prompt.shape[1] + new_tokens) for k, m in models.items()}
    probe = MatvecProbe(probe_mbytes, device)
    # the longest prefill holds the largest logits: peak memory is measured with it
    mem = {k: memory_pass(m, xl, prompt, new_tokens, device, caches[k], steps.get(k)) for k, m in models.items()}
    t = {k: {"prefill": [], "decode": [], **{n: [] for n in more_prefill}} for k in models}
    bw = []
    names = list(models)
    for r in range(warmup + runs):
        # each round starts one model later (dense, pruned / pruned, dense / ...): a drift of the machine's
        # load within a round does not always land on the same model
        for k in names[r % len(names):] + names[:r % len(names)]:
            m = models[k]
            tp = prefill_seconds(m, x, device)
            td = greedy_decode(m, prompt, new_tokens, device, steps.get(k), caches[k])[1]
            more = {n: prefill_seconds(m, xl[:, :n], device) for n in more_prefill}
            if r >= warmup:
                t[k]["prefill"].append(tp)
                t[k]["decode"].append(td)
                for n, v in more.items():
                    t[k][n].append(v)
            if verbose:
                print(f"  round {r + 1}/{warmup + runs}{' (warm-up)' if r < warmup else ''} {k}: prefill "
                      f"{seqlen / tp:,.1f} tok/s, decode {new_tokens / td:,.2f} tok/s", flush=True)
        tb = probe.seconds()
        if r >= warmup:
            bw.append(probe.bytes / tb)
    bandwidth = dict(spread(bw), matrix_bytes=probe.bytes, what="fp32 matrix-vector product, bytes/s, fastest of 3 a round")
    out = {}
    for k, m in models.items():
        pre, dec = spread(t[k]["prefill"]), spread(t[k]["decode"])
        wb = weight_bytes_per_token(m)
        roof = bandwidth["median"] / wb
        out[k] = {"prefill_tok_s": seqlen / pre["median"], "decode_tok_s": new_tokens / dec["median"],
                  "prefill_s": pre, "decode_s": dec, "seqlen": seqlen, "new_tokens": new_tokens,
                  "peak_mem_bytes": mem[k][0], "peak_mem_kind": mem[k][1], "weight_bytes_per_token": wb,
                  "roofline_tok_s": roof, "roofline_fraction": new_tokens / dec["median"] / roof,
                  "runs": runs, "warmup": warmup, "interleaved_with": list(models), "compiled": k in steps,
                  "threads": torch.get_num_threads(), "quant_paths": quant_paths_used(m),
                  "prefill_more": {n: spread(t[k][n]) for n in more_prefill}}
    return out, bandwidth


def quant_paths_used(model):
    """{path: number of Linears} of the quantized Linears (quant_paths.py); {} for a dense model."""
    used = {}
    for m in model.modules():
        if hasattr(m, "bytes_read"):
            used[m.path] = used.get(m.path, 0) + 1
    return used


def speedups(ref, other):
    """Prefill and decode speedup of `other` over `ref`: ratios of the interleaved median times."""
    return {"prefill": ref["prefill_s"]["median"] / other["prefill_s"]["median"],
            "decode": ref["decode_s"]["median"] / other["decode_s"]["median"]}


def compiled_steps(models):
    """torch.compile'd forwards for the decode steps (dynamic shapes: the cache grows by one position a step)."""
    return {k: torch.compile(m, dynamic=True) for k, m in models.items()}


# ---------------------------------------------------------------- entry points of eval.py

def one_model(model, seqlen, new_tokens=128, runs=5, device="cpu", seed=0, warmup=1, probe_mbytes=256, compile=False):
    """One model's prefill and decode tokens/s (medians over `runs` rounds after `warmup`), spread, peak memory
    and fraction of the bandwidth roofline, batch 1 (interleaved_latency with a single model)."""
    steps = compiled_steps({"model": model}) if compile else None
    res, bw = interleaved_latency({"model": model}, seqlen, new_tokens, runs, warmup, device, seed, probe_mbytes,
                                  steps, verbose=True)
    return dict(res["model"], bandwidth=bw)


def two_models(dense, pruned, seqlen, new_tokens, runs, device, **latency_opts):
    """Both models timed in the same interleaved rounds: (dense latency, pruned latency)."""
    seqlen = min(seqlen, dense.cfg.max_position_embeddings, pruned.cfg.max_position_embeddings)
    print(f"latency: prefill {seqlen:,} tokens, decode {new_tokens} tokens, dense and pruned interleaved, "
          f"{runs} timed rounds")
    compile = latency_opts.pop("compile", False)
    models = {"dense": dense, "pruned": pruned}
    steps = compiled_steps(models) if compile else None
    out, bw = interleaved_latency(models, seqlen, new_tokens, runs, device=device, steps=steps, verbose=True,
                                  **latency_opts)
    return dict(out["dense"], bandwidth=bw), dict(out["pruned"], bandwidth=bw)


def print_note(la):
    """The lines under a latency table: quantized paths, rounds, threads, bandwidth."""
    bw = la["bandwidth"]
    if la["quant_paths"]:
        print("quantized Linears ran through " + ", ".join(f"{k} ({n})" for k, n in la["quant_paths"].items()))
    print(f"\nlatency: {la['runs']} timed rounds after {la['warmup']} warm-up, models interleaved "
          f"({', '.join(la['interleaved_with'])}), {la['threads']} thread(s){', decode compiled' if la['compiled'] else ''}; "
          f"bandwidth {bw['median'] / 1e9:,.2f} GB/s (median; {bw['min'] / 1e9:,.2f}-{bw['max'] / 1e9:,.2f}) "
          f"from a {bw['matrix_bytes'] / 2**20:,.0f} MiB {bw['what'].split(',')[0]}")
