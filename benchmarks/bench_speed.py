"""Speed table (section "speed" of BENCHMARKS.md): dense, bf16, depth-pruned, pruned + GPTQ 4-bit and dense
4-bit, timed side by side in ONE interleaved run, with perplexity on the same WikiText-2 windows.

    CLP_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/bench_speed.py --threads 1

The pruned checkpoints are the gate's blocks on the embedded model (BENCHMARKS.md, section search):
20% = layers 13-18, 30% = layers 12-20, cut out with excise.py; the 4-bit checkpoints are GPTQ 4-bit g128
(quantize.py, 32 x 512 calibration tokens, seed 0). Every model is loaded at once and timed round-robin by
latency.interleaved_latency: prefill of 512 and 2048 tokens, decode of 128 tokens after a 128-token prompt,
and the bandwidth probe, in each round. --baseline-rev adds the decoder of an older commit (its model.py,
row-major weights) as one more row, so "before" and "after" share the same rounds.
"""
import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import ROOT, command, load_cells, store_cell, update_section  # noqa: E402

import load_weights  # noqa: E402
import latency as lat  # noqa: E402
from data import find_data_dir  # noqa: E402
from eval import text_metrics, text_windows  # noqa: E402
from machinery.atomic import write_json  # noqa: E402
from quantize import dir_bytes  # noqa: E402

BLOCKS = {"20": "13-18", "30": "12-20"}


def load_average():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def checkpoints(a):
    """{name: directory}: the dense source, the two pruned models and the two GPTQ 4-bit g128 models."""
    import excise
    import quantize

    out = {"dense": load_weights.resolve(a.ckpt)}
    for r, block in BLOCKS.items():
        d = a.work / f"pruned-{block}"
        if not (d / "config.json").is_file():
            excise.run(a.ckpt, d, layers=block)
        out[f"pruned{r}"] = d
    for name, src, given in (("pruned30-gptq4", out["pruned30"], None), ("dense-gptq4", out["dense"], a.dense_4bit)):
        d = given or a.work / f"{name}-g128"
        if not (d / "config.json").is_file():
            quantize.run(src, d, method="gptq", bits=4, group_size=128, nsamples=32, seqlen=512, seed=0,
                                data_dir=a.data_dir)
        out[name] = d
    return out


def baseline_model(rev, dense):
    """The decoder of commit `rev` (its model.py) holding the dense weights in row-major layout, behind the
    make_cache / last_only interface the timing uses (the old head always ran over every position)."""
    src = subprocess.run(["git", "show", f"{rev}:model.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    path = ROOT / "runs" / "bench_speed" / f"model_{rev}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"model_{rev}", path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)

    class Cache:
        def __init__(self):
            self.reset()

        def reset(self):
            self.c = old.KVCache(dense.cfg.num_layers)

    class Baseline(torch.nn.Module):
        def __init__(self):
            super().__init__()
            with torch.device("meta"):
                self.m = old.Transformer(dense.cfg)
            state = {k: v.contiguous() for k, v in dense.state_dict().items()}  # the old row-major layout
            self.m.load_state_dict(state, strict=True, assign=True)
            if dense.cfg.tie_word_embeddings:
                self.m.lm_head.weight = self.m.embed_tokens.weight
            self.m.inv_freq = old.rope_frequencies(dense.cfg)
            self.cfg, self.embed_tokens, self.lm_head = dense.cfg, self.m.embed_tokens, self.m.lm_head
            self.inv_freq = self.m.inv_freq

        def make_cache(self, batch=1, max_len=None):
            return Cache()

        def forward(self, tokens, cache=None, last_only=False):
            return self.m(tokens, cache=None if cache is None else cache.c)

    return Baseline().eval()


def build_models(ckpts, a):
    """[(row name, label, model, checkpoint dir, layers)] in table order."""
    L = lambda m: m.cfg.num_layers  # noqa: E731
    rows = []
    dense = load_weights.load(ckpts["dense"])[0]
    rows.append(("dense", "dense fp32", dense, ckpts["dense"]))
    if a.compile:
        rows.append(("compiled", "dense fp32, decode steps torch.compile'd", dense, ckpts["dense"]))
    if a.baseline_rev:
        rows.append(("before", f"dense fp32, decoder of {a.baseline_rev} (before)", baseline_model(a.baseline_rev, dense),
                     ckpts["dense"]))
    if a.bf16:
        rows.append(("bf16", "dense bf16", load_weights.load(ckpts["dense"], dtype=torch.bfloat16)[0], ckpts["dense"]))
    for r, block in BLOCKS.items():
        rows.append((f"pruned{r}", f"pruned {r}% (layers {block} removed)", load_weights.load(ckpts[f"pruned{r}"])[0],
                     ckpts[f"pruned{r}"]))
    for path in a.quant_paths:
        rows.append((f"pruned30-gptq4-{path}", f"pruned 30% + GPTQ 4-bit g128 ({path})",
                     load_weights.load(ckpts["pruned30-gptq4"], quant_path=path)[0], ckpts["pruned30-gptq4"]))
    rows.append((f"dense-gptq4-{a.quant_paths[0]}", f"dense + GPTQ 4-bit g128 ({a.quant_paths[0]})",
                 load_weights.load(ckpts["dense-gptq4"], quant_path=a.quant_paths[0])[0], ckpts["dense-gptq4"]))
    for n, _, m, _ in rows:
        if n != "before":
            load_weights.decode_layout(m)  # models that decode: the faster CPU layout (docs/speed.md)
    return [(n, label, m, d, L(m)) for n, label, m, d in rows]


def perplexities(rows, a):
    """WikiText-2 perplexity of every row on the same first --windows windows, cached per row and subset."""
    cache_file = a.work / "ppl.json"
    cache = load_cells(cache_file)
    _, tok = load_weights.load(rows[0][3])
    (key, (windows, desc)), = text_windows(tok, ["wikitext2"], 2048, a.data_dir, False, a.windows).items()
    desc = desc.replace(str(find_data_dir(a.data_dir)), "$CLP_DATA")  # no path of this machine in BENCHMARKS.md
    out, seen = {}, {}
    for name, label, m, d, _ in rows:
        # rows with the same weights as an earlier row (another decode step or decoder, another quantized path:
        # equal outputs, tests/test_quant_paths.py) share its perplexity
        same = "dense" if name in ("before", "compiled") else seen.get(str(d)) if "gptq4" in name else None
        seen.setdefault(str(d), name)
        if same:
            out[name] = out[same]
            continue
        ck = f"{name}|{d}|{key}"
        if ck not in cache:
            print(f"perplexity of {label} on {desc}", flush=True)
            store_cell(cache_file, cache, ck, text_metrics(m, windows, label=f"ppl {name}")["ppl"])
        out[name] = cache[ck]
    return out, key, desc


def row_md(name, label, L, res, dense, ppl, disk, Ld):
    f = lambda s, n: f"{n / s['median']:,.1f} ({n / s['max']:,.1f}-{n / s['min']:,.1f})"  # noqa: E731
    sp = lat.speedups(dense, res)
    pre2k = dense["prefill_more"][2048]["median"] / res["prefill_more"][2048]["median"]
    ideal = f"{Ld / L:.2f}" if L != Ld else "1"
    return (f"| {label} | {L} | {disk / 1e6:,.0f} | {f(res['prefill_s'], res['seqlen'])} | "
            f"{f(res['prefill_more'][2048], 2048)} | {f(res['decode_s'], res['new_tokens'])} | "
            f"{res['roofline_fraction']:.0%} | {sp['prefill']:.2f} / {pre2k:.2f} / {sp['decode']:.2f} | {ideal} | "
            f"{res['peak_mem_bytes'] / 2**20:,.0f} | {ppl:,.2f} |")


def markdown(rows, res, bw, ppl, key, desc, a, loads, wall):
    dense = res["dense"]
    Ld = rows[0][4]
    lines = [
        "## Speed: dense, pruned, quantized side by side (one interleaved run)", "",
        f"Command: `{command()}`", "",
        f"One process, every model loaded at once; {a.runs} timed rounds after one untimed round (warm-up and peak "
        f"memory); each round times every model, starting one model later than the round before (prefill of 512 and "
        f"of 2048 tokens, decode of 128 "
        f"tokens after a 128-token prompt, greedy, static KV cache) and the bandwidth probe. Figures: median "
        f"(min-max) over the rounds; speedups are ratios of medians. **Threads: {torch.get_num_threads()}**. "
        f"Machine shared with other jobs: 1-minute load average {loads[0]:.2f} at the start, {loads[1]:.2f} at the "
        f"end (2 cores); wall time {wall / 60:,.0f} min.", "",
        f"Bandwidth roofline: an fp32 matrix-vector product over a {bw['matrix_bytes'] / 2**20:,.0f} MiB matrix read "
        f"{bw['median'] / 1e9:,.2f} GB/s (the fastest of 3 products in each round, median over rounds; "
        f"{bw['min'] / 1e9:,.2f}-{bw['max'] / 1e9:,.2f}); "
        "*roofline* = decode tok/s / (bandwidth / weight bytes read per token).", "",
        "| model | layers | disk MB | prefill 512 tok/s | prefill 2048 tok/s | decode tok/s | decode / roofline | "
        "speedup vs dense (prefill 512 / 2048 / decode) | ideal L/(L-k) | peak MiB | ppl |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label, m, d, L in rows:
        lines.append(row_md(name, label, L, res[name], dense, ppl[name], dir_bytes(d), Ld))
    wb = {name: res[name]["weight_bytes_per_token"] for name, *_ in rows}
    lines += [
        "", f"Perplexity: WikiText-2 raw test, {desc} (`{key}`), the same windows for every row; rows with the "
        "weights of an earlier row (the old decoder, the compiled steps, the second quantized path) show its figure; "
        f"figures are cached in `{a.work}/ppl.json` per row, checkpoint and subset, and not recomputed.",
        "Weight MB read per decode token (the roofline's numerator): "
        + ", ".join(f"{name} {v / 1e6:,.0f}" for name, v in wb.items()) + ".",
        "Quantized rows: the path each one ran is in its label (quant_paths.py); the checkpoint is the same. "
        "*unpacked* reads 1-byte codes and dequantizes into a scratch matrix every forward; *dequantized* holds the "
        "fp32 weight from load on (the dense model's memory and speed). The CPU int4/int8 kernels of torch were "
        "slower than both here (docs/speed.md).",
        "Peak memory: the row's own parameters and buffers plus what its runs added to the process's peak RSS.",
        "Disk: all safetensors files of the checkpoint (bf16 loads the fp32 files).",
    ]
    return "\n".join(lines)


def build_parser():
    """The command line, built without running anything (tests/test_docs.py reads its flags)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="smollm2-135m", help="dense checkpoint")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for every model")
    p.add_argument("--runs", type=int, default=3, help="timed interleaved rounds")
    p.add_argument("--windows", type=int, default=8, help="perplexity windows of 2048 tokens (the first ones)")
    p.add_argument("--quant-paths", default="unpacked,dequantized", help="comma-separated paths for the pruned 4-bit rows")
    p.add_argument("--compile", action="store_true", help="add the dense model with torch.compile'd decode steps")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="leave out the bf16 row")
    p.add_argument("--dense-4bit", type=Path, default=None,
                   help="an existing GPTQ 4-bit g128 checkpoint of the dense model made with the same settings")
    p.add_argument("--baseline-rev", default=None, help="git revision whose model.py is timed as the 'before' row")
    p.add_argument("--data-dir", type=Path, default=None, help="data directory; None: $CLP_DATA, then ./data")
    p.add_argument("--work", type=Path, default=Path("runs/bench_speed"), help="checkpoints and caches")
    p.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    return p


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    a.quant_paths = a.quant_paths.split(",")
    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)
    t0, load0 = time.perf_counter(), load_average()
    rows = build_models(checkpoints(a), a)
    models = {name: m for name, _, m, _, _ in rows}
    print(f"timing {len(models)} models interleaved, {a.runs} rounds, {a.threads} thread(s)", flush=True)
    steps = {"compiled": torch.compile(models["compiled"], dynamic=True)} if a.compile else None
    res, bw = lat.interleaved_latency(models, 512, 128, runs=a.runs, warmup=0, more_prefill=(2048,), steps=steps,
                                      verbose=True)
    load1 = load_average()
    ppl, key, desc = perplexities(rows, a)
    md = markdown(rows, res, bw, ppl, key, desc, a, (load0, load1), time.perf_counter() - t0)
    print(md)
    write_json(a.work / "bench_speed.json", {"command": command(), "results": res, "bandwidth": bw, "ppl": ppl,
                                             "load_average": [load0, load1], "threads": a.threads})
    if not a.no_write:
        update_section("speed", md)


if __name__ == "__main__":
    main()
