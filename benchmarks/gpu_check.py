"""One prepared check for a machine with one GPU and nothing to download (at most about 8 minutes).

    python benchmarks/gpu_check.py            # one GPU: writes (the first time, appends) the "gpu-check" section of BENCHMARKS.md
    python benchmarks/gpu_check.py --smoke    # tiny sizes on the CPU: only checks that the script runs

It uses only what travels with the repository: the tiny fixtures (tests/fixtures) and
models of real shapes with seeded random weights (random:NAME reads configs/NAME/config.json). It measures
1. bf16 logits of the tiny fixtures against the fp32 references of an independent implementation;
2. latency of random:llama2-7b and random:llama3-8b, dense against 30% of the layers excised in memory
   (prefill 1 x 2048, decode 128 tokens, dense and pruned runs interleaved, medians), ideal L/(L-k) beside;
3. peak GPU memory of a gate search (teacher pass + gate steps) and of GPTQ on one layer of the 7B;
4. a random:llama2-70b teacher pass with --offload: one layer's weights held in CPU memory are streamed
   to the GPU at each of the 80 positions (the real host-to-device traffic of an offloaded 70B).
Random weights: speed and memory only, no quality figure.
"""
import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import quantize  # noqa: E402
import search  # noqa: E402
from benchmarks.common import command, update_section  # noqa: E402
from latency import sync  # noqa: E402
from machinery import placement  # noqa: E402
from machinery.devices import peak_bytes, reset_peak  # noqa: E402
from teacher import build_teacher  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"  # the reference fixtures travel with the repository
TINY = ["tiny-llama2", "tiny-llama3", "tiny-qwen2", "tiny-qwen3"]
FULL = dict(latency_models=["llama2-7b", "llama3-8b"], prefill=2048, decode=128, runs=5, ratio=0.3,
            search_model="llama2-7b", search=(16, 512), gate_steps=3, gptq=(128, 2048),
            offload_model="llama2-70b", offload_tokens=(4, 512))
SMOKE = dict(latency_models=[str(FIXTURES / "tiny-llama2"), str(FIXTURES / "tiny-llama3")], prefill=32, decode=4,
             runs=3, ratio=0.3, search_model=str(FIXTURES / "tiny-llama2"), search=(4, 16), gate_steps=2,
             gptq=(4, 32), offload_model=str(FIXTURES / "tiny-llama3"), offload_tokens=(2, 16))


def gib(n):
    return f"{n / 2**30:,.2f} GiB"


def seconds(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------- 1. fixture logits in bf16

def fixture_rows(device):
    """| fixture | max |fp32 - ref| | max |bf16 - ref| | top-1 agreement bf16 |"""
    rows = []
    for name in TINY:
        d = FIXTURES / name
        if not (d / "reference.safetensors").is_file():
            rows.append(f"| {name} | fixture not found at tests/fixtures | | |")
            continue
        ref = load_file(d / "reference.safetensors")
        ids, want = ref["input_ids"], ref["logits"].to(device)
        got = {dt: placement.load_placed(d, device=str(device), dtype=dt)[0](ids).float() for dt in ("float32", "bfloat16")}
        agree = (got["bfloat16"].argmax(-1) == want.argmax(-1)).float().mean()
        rows.append(f"| {name} | {(got['float32'] - want).abs().max():.2e} | {(got['bfloat16'] - want).abs().max():.2e} "
                    f"| {agree:.1%} |")
    return rows


# ---------------------------------------------------------------- 2. latency, dense vs excised in memory

@torch.no_grad()
def latency_row(name, device, s):
    model = random(name, device)
    L = model.cfg.num_layers
    k = round(s["ratio"] * L)
    s0 = (L - k) // 2
    pruned = model.without(range(s0, s0 + k))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(model.cfg.vocab_size, (1, s["prefill"]), generator=g).to(device)
    prompt = x[:, :min(128, s["prefill"])]
    times = {m: {"pre": [], "dec": []} for m in ("dense", "pruned")}
    for r in range(s["runs"] + 1):  # run 0 warms up
        for m, net in (("dense", model), ("pruned", pruned)):
            pre = seconds(lambda: net(x), device)
            # decode alone: generating n tokens minus generating 1 (the prompt's prefill and first token)
            dec = (seconds(lambda: net.generate(prompt, s["decode"] + 1), device)
                   - seconds(lambda: net.generate(prompt, 1), device))
            if r:
                times[m]["pre"].append(pre)
                times[m]["dec"].append(dec)
    med = {m: {k2: statistics.median(v) for k2, v in t.items()} for m, t in times.items()}
    del model, pruned
    free(device)
    return (f"| {Path(name).name} | {L} -> {L - k} | {s['prefill'] / med['dense']['pre']:,.0f} -> "
            f"{s['prefill'] / med['pruned']['pre']:,.0f} ({med['dense']['pre'] / med['pruned']['pre']:.2f}x) | "
            f"{s['decode'] / med['dense']['dec']:,.1f} -> {s['decode'] / med['pruned']['dec']:,.1f} "
            f"({med['dense']['dec'] / med['pruned']['dec']:.2f}x) | {L / (L - k):.2f}x |")


def random(name, device, **kw):
    return placement.load_placed(f"random:{name}", device=str(device), **kw)[0]


def free(device):
    # a placed layer's forward refers back to the layer: only the cycle collector frees a dropped model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- 3. peak memory of a gate search and a GPTQ layer

def measured(device, fn):
    """(result, peak bytes during fn, what was measured)."""
    reset_peak(device)
    out = fn()
    return (out, *peak_bytes(device))


def planned(task, **flags):
    """The --dry-run peak of the same run from plan.py, where this checkout has it; else why there is none."""
    try:
        from machinery import plan

        return gib(max(r.peak for r in plan.plan_for(task, {"search": search.memory_plan, "quantize": quantize.memory_plan}[task], flags).rows))
    except Exception as e:  # the plan is optional here: its absence must not cost the GPU run
        return f"no plan ({type(e).__name__}: {' '.join(str(e).split())[:60]})"


def search_memory(s, device):
    n, T = s["search"]
    model = random(s["search_model"], device)
    ids = torch.randint(model.cfg.vocab_size, (n, T), generator=torch.Generator().manual_seed(0))
    k = round(s["ratio"] * model.cfg.num_layers)
    t0 = time.perf_counter()
    teacher, peak_t, kind = measured(device, lambda: build_teacher(model, ids))
    t1 = time.perf_counter()
    _, peak_s, _ = measured(device, lambda: search.train_gates(model, teacher, search.make_gates(model.cfg.num_layers, k, 1, 1),
                                                             s["gate_steps"], 1, 1.0, 2.0, 0.05, 0, 1024, 100, False))
    step = (time.perf_counter() - t1) / s["gate_steps"]
    cache = sum(h.numel() * h.element_size() for h in teacher.hidden)
    plan = planned("search", ckpt=f"random:{s['search_model']}", device=str(device), nsamples=n, seqlen=T, prune_layers=k,
                   batch_size=1, kl_chunk=1024, steps=s["gate_steps"], starts=1, halving=False, radius=0)
    rows = [f"| gate search, teacher pass ({n} x {T} tokens) | {gib(peak_t)} | | cache {gib(cache)}, {t1 - t0:.1f} s |",
            f"| gate search, {s['gate_steps']} gate steps (batch 1, k = {k}) | {gib(peak_s)} | {plan} | "
            f"{step:.2f} s/step |"]
    layer = model.layers[0]
    del teacher
    n, T = s["gptq"]
    ids = torch.randint(model.cfg.vocab_size, (n, T), generator=torch.Generator().manual_seed(1))
    settings = dict(method="gptq", bits=4, group_size=128, sym=False, act_order=False, blocksize=128, percdamp=0.01)

    def one_layer():
        with torch.no_grad():
            X = model.embed_tokens(ids.to(device))
            cos, sin = model.rope(0, T)
            return quantize.quantize_block(layer, X, cos, sin, settings, max(1, 4096 // T))
    t0 = time.perf_counter()
    _, peak_q, _ = measured(device, one_layer)
    plan = planned("quantize", ckpt=f"random:{s['search_model']}", device=str(device), nsamples=n, seqlen=T, bits=4)
    rows.append(f"| GPTQ of layer 0 ({n} x {T} calibration tokens, 4 bit, g128) | {gib(peak_q)} | {plan} | "
                f"{time.perf_counter() - t0:.1f} s |")
    del model, layer
    free(device)
    return rows, kind


# ---------------------------------------------------------------- 4. an offloaded 70B teacher pass

def offload_row(s, device):
    """Teacher pass of an offloaded model whose every layer is one CPU-held random layer (real H2D traffic)."""
    model = random(s["offload_model"], device, offload=True)
    fetch_random = model.layers[0].fetch
    cpu = {n: fetch_random(f"layers.0.{n}", p, torch.device("cpu"), model.layers[0].dtype)
           for n, p in model.layers[0].named_parameters()}

    def from_cpu(name, p, dev, dtype):
        return cpu[name.split(".", 2)[2]].to(dev, dtype)
    for layer in model.layers:
        layer.fetch = from_cpu
    n, T = s["offload_tokens"]
    ids = torch.randint(model.cfg.vocab_size, (n, T), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    teacher, peak_b, kind = measured(device, lambda: build_teacher(model, ids, cache_device="cpu"))
    sync(device)
    took = time.perf_counter() - t0
    layer_bytes = sum(t.numel() * t.element_size() for t in cpu.values())
    L = model.cfg.num_layers
    del model, teacher
    free(device)
    return (f"| {Path(s['offload_model']).name} teacher pass, --offload, {n} x {T} tokens, cache in CPU memory | "
            f"{gib(peak_b)} | | {took:.1f} s, {L} layers x {gib(layer_bytes)} streamed "
            f"({L * layer_bytes / took / 2**30:.1f} GiB/s) |")


# ---------------------------------------------------------------- report

def report(smoke, device):
    s = SMOKE if smoke else FULL
    t0 = time.perf_counter()
    out = ["## GPU check (random weights: speed and memory only)", "",
           f"`{command()}` on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU (smoke sizes)'}.",
           "", "Tiny fixtures against the fp32 logits of an independent implementation:", "",
           "| fixture | max abs diff, fp32 | max abs diff, bf16 | top-1 agreement, bf16 |", "|---|---|---|---|"]
    out += fixture_rows(device)
    print("\n".join(out), flush=True)
    dtype = "bf16" if device.type == "cuda" else "fp32"
    out += ["", f"Latency, dense -> {s['ratio']:.0%} of the layers excised in memory ({dtype}, batch 1; prefill "
            f"{s['prefill']} tokens, decode {s['decode']} tokens with the KV cache; {s['runs']} interleaved runs after a "
            f"warm-up, medians):", "",
            "| model | layers | prefill tok/s | decode tok/s | ideal L/(L-k) |", "|---|---|---|---|---|"]
    out += [latency_row(m, device, s) for m in s["latency_models"]]
    print("\n".join(out[-len(s["latency_models"]):]), flush=True)
    rows, kind = search_memory(s, device)
    rows.append(offload_row(s, device))
    out += ["", f"Peak memory ({kind}), {Path(s['search_model']).name} unless named:", "",
            "| what | peak | dry-run peak | notes |", "|---|---|---|---|"] + rows
    out += ["", "The dry-run column is plan.py's peak for the same run where this checkout has it (a whole search or "
            "quantize run; the measured rows are its teacher pass and gate steps, and one GPTQ layer).",
            f"Whole check: {time.perf_counter() - t0:.0f} s."]
    return "\n".join(out)


def build_parser():
    """The command line, built without running anything (tests/test_docs.py reads its flags)."""
    p = argparse.ArgumentParser(description="One prepared GPU check: fixture logits in bf16, latency dense vs pruned, "
                                            "peak memory of search and GPTQ, an offloaded 70B teacher pass.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: check that the script runs, write nothing")
    p.add_argument("--device", default="cuda", help="the GPU to check (ignored with --smoke)")
    return p


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    device = torch.device("cpu") if a.smoke else torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: run with --smoke on a CPU-only machine")
    text = report(a.smoke, device)
    print(text)
    if not a.smoke:
        update_section("gpu-check", text)
    return text


if __name__ == "__main__":
    main()
