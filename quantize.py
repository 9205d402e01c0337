"""GPTQ (Frantar et al., 2022) and round-to-nearest weight quantization, written to the GPTQ checkpoint layout.

    python quantize.py --ckpt smollm2-135m --bits 4 --group-size 128 --out runs/smollm2-gptq-4b-g128
    python quantize.py --ckpt runs/smollm2-pruned --method rtn --bits 3 --group-size 128 --out runs/p-rtn-3b

GPTQ runs layer by layer through our own decoder loop: the calibration sequences' hidden states enter
Block 0; inside each Block the Linears are quantized in the order they compute ([q,k,v], [o], [gate,up],
[down]), each group seeing the inputs produced by the already-quantized ones; the Block's quantized output
then feeds the next Block. For a Linear with weight W (O, I) and calibration inputs X (I, n tokens) the
objective is the proxy loss ||W X - Q X||^2, with Hessian H = 2 X X^T / n.

The per-matrix algorithms (the grids, round-to-nearest, GPTQ's Algorithm 1) live in gptq.py.
Embeddings, norms and the output head stay unquantized, as in the paper.
"""
import argparse
import time
from pathlib import Path

import torch

from data import calibration_windows
from gptq import Quantized, gptq, proxy_error, rtn
from gptq_format import SUPPORTED_BITS, check_packable, pack, quantization_config
from latency import model_bytes
from machinery import atomic, devices, memory, placement, plan, resume
from machinery.atomic import write_json
from machinery.devices import DTYPES, peak_memory
from machinery.errors import UserError, check_finite, cli, old_spelling
from machinery.paths import shown
from load_weights import load, read_config_dict, resolve
from model import LINEARS, Transformer, hf_state_dict
from save_weights import save_checkpoint

# Linears that share one input, hence one H, in the order a Block computes them
SUBLAYERS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
             ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


# ---------------------------------------------------------------- sequential calibration through the decoder

class _Captured(Exception):
    """Raised by the input hook: the rest of the Block's forward is not needed for this sublayer."""


@torch.no_grad()
def input_hessian(layer, module_name, X, cos, sin, rows):
    """H = 2 X X^T / n for the inputs of `layer.<module_name>` over all calibration sequences X (N, T, C)."""
    acc = {"H": None, "n": 0}

    def hook(_, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()  # (B*T, I)
        acc["H"] = 2 * x.t() @ x if acc["H"] is None else acc["H"].addmm_(x.t(), x, alpha=2)
        acc["n"] += x.shape[0]
        raise _Captured

    handle = layer.get_submodule(module_name).register_forward_pre_hook(hook)
    try:
        for xb in X.split(rows):
            try:
                layer(xb, cos, sin)
            except _Captured:
                pass
    finally:
        handle.remove()
    return acc["H"] / acc["n"]


@torch.no_grad()
def quantize_block(layer, X, cos, sin, settings, rows):
    """Quantize one Block's Linears in place (weights := dequantized Q); returns {name: (Quantized, stats)}."""
    out = {}
    for group in SUBLAYERS:
        H = input_hessian(layer, group[0], X, cos, sin, rows)
        check_finite(H, f"the Hessian 2XX^T/n of the inputs of {group[0]}")
        for name in group:
            lin = layer.get_submodule(name)
            W = lin.weight.float()
            t0 = time.perf_counter()
            if settings["method"] == "gptq":
                res = gptq(W, H, settings["bits"], settings["group_size"], settings["sym"], settings["act_order"],
                           settings["blocksize"], settings["percdamp"])
            else:
                res = rtn(W, settings["bits"], settings["group_size"], settings["sym"])
            seconds = time.perf_counter() - t0
            Q = res.dequantize()
            stats = {"proxy_error": proxy_error(W, Q, H), "seconds": seconds,
                     "proxy_error_rtn": proxy_error(W, rtn(W, settings["bits"], settings["group_size"],
                                                            settings["sym"]).dequantize(), H)}
            lin.weight.copy_(Q.to(lin.weight.dtype))
            out[name] = (res.cpu(), stats)
    return out


@torch.no_grad()
def quantize_model(model, tokens, settings, rows=None, work=resume.OFF):
    """Quantize every Block of `model` in place, sequentially; tokens (N, T) calibration, or None for data-free RTN.

    Returns ({"layers.i.<linear>": Quantized}, [per-sublayer report rows]). `work` (resume.LayerStore) keeps
    each finished layer and gives back the ones an interrupted run already wrote.
    """
    results, report = {}, []
    L = len(model.layers)
    t_start = time.perf_counter()
    if tokens is None:
        for i in range(L):
            layer = placement.on_device(model, i)
            for name in LINEARS:
                lin = layer.get_submodule(name)
                res = rtn(lin.weight.float(), settings["bits"], settings["group_size"], settings["sym"])
                lin.weight.copy_(res.dequantize().to(lin.weight.dtype))
                results[f"layers.{i}.{name}"] = res.cpu()
            print(f"layer {i:3d}/{L} rounded to nearest (no data); elapsed {time.perf_counter() - t_start:,.1f}s")
        return results, report
    N, T = tokens.shape
    rows = rows or max(1, 4096 // T)
    cos, sin = model.rope(0, T)
    X = model.embed_tokens(tokens)  # (N, T, C), in the weights' dtype; H is accumulated in fp32
    for i in range(L):
        t0 = time.perf_counter()
        check_finite(X, f"the calibration activations entering layer {i}")
        # the layer on its device (a fresh copy when streamed: quantized in place, then let go)
        layer = placement.on_device(model, i)
        X = X.to(layer.device)
        if work.has(i):
            block, block_rows = load_block(layer, work, i)
        else:
            block, block_rows = {}, []
            for name, (res, stats) in quantize_block(layer, X, cos, sin, settings, rows).items():
                block[name] = res
                block_rows.append({"layer": i, "sublayer": name, **stats})
                print(f"layer {i:3d}/{L}  {name:<17} proxy {stats['proxy_error']:10.4e}  "
                      f"(rtn {stats['proxy_error_rtn']:10.4e})  {stats['seconds']:6.2f}s", flush=True)
            work.save(i, block, block_rows)
        results.update({f"layers.{i}.{name}": res for name, res in block.items()})
        report += block_rows
        # the quantized Block's output is the next Block's input
        X = torch.cat([layer(xb, cos, sin) for xb in X.split(rows)])
        elapsed = time.perf_counter() - t_start
        print(f"layer {i:3d}/{L} done in {time.perf_counter() - t0:,.1f}s; elapsed {elapsed:,.0f}s, "
              f"about {elapsed / (i + 1) * (L - i - 1):,.0f}s left", flush=True)
    return results, report


@torch.no_grad()
def load_block(layer, work, i):
    """A layer an interrupted run finished: its weights become its dequantized Q, as they were then."""
    block, block_rows = work.load(i, Quantized)
    for name, res in block.items():
        lin = layer.get_submodule(name)
        lin.weight.copy_(res.dequantize().to(lin.weight.dtype))
    print(f"layer {i:3d}: quantized by the interrupted run, read back from {work.work}")
    return block, block_rows


# ---------------------------------------------------------------- checks, calibration data, saving

def check_flags(raw_config, bits, group_size, blocksize, percdamp, method, nsamples):
    """Clear errors for settings or a config.json this quantizer cannot handle, before the model loads."""
    if raw_config.get("quantization_config"):
        qc = raw_config["quantization_config"]
        raise UserError(f"the checkpoint is already quantized ({qc.get('quant_method')}, {qc.get('bits')} bits): "
                         f"quantize the unquantized source checkpoint instead")
    if bits not in SUPPORTED_BITS:
        raise UserError(f"--bits {bits} is not supported (supported: {', '.join(map(str, SUPPORTED_BITS))})")
    if group_size != -1 and group_size < 1:
        raise UserError(f"--group-size {group_size}: use -1 (one grid per output channel) or a positive size")
    if blocksize < 1 or not 0 < percdamp < 1:
        raise UserError(f"--blocksize must be >= 1 and --percdamp in (0, 1), got {blocksize} and {percdamp}")
    if method == "gptq" and nsamples < 1:
        raise UserError("GPTQ needs calibration data: --nsamples must be >= 1 (only --method rtn runs without)")


def check_linears(model, group_size):
    """Clear errors for Linears this quantizer cannot pack, before any work is done."""
    ragged = {}
    for i, layer in enumerate(model.layers):
        for name in LINEARS:
            lin = layer.get_submodule(name)
            check_packable(f"layers.{i}.{name}", lin.in_features, lin.out_features)
            if group_size != -1 and lin.in_features % group_size:
                ragged.setdefault(lin.in_features, set()).add(name.split(".")[-1])
    for I, names in sorted(ragged.items()):
        print(f"note: --group-size {group_size} does not divide in_features = {I} ({', '.join(sorted(names))}): "
              f"the last of its ceil({I}/{group_size}) = {-(-I // group_size)} groups has {I % group_size} columns, "
              f"as the format allows (g_idx = i // group_size)")


def check_calibration(tokens, max_in):
    """GPTQ needs several times more calibration tokens than a Linear has inputs: H = 2XX^T has rank <= tokens."""
    n = tokens.numel()
    if n < 10 * max_in:
        print(f"warning: only {n:,} calibration tokens for Linears with up to {max_in:,} inputs: H = 2XX^T has rank "
              f"<= {n:,} and GPTQ needs several times more tokens than inputs; raise --nsamples or --seqlen")


def packed_tensors(model, results, bits, dtype):
    """HF-named tensors of the quantized checkpoint: packed Linears, everything else cast to `dtype`."""
    tensors = {k: v.to(dtype) for k, v in hf_state_dict(model).items()}
    for name, res in results.items():
        del tensors[f"model.{name}.weight"]
        tensors.update({f"model.{name}.{k}": v for k, v in pack(res.codes, res.scales, res.zeros, res.g_idx,
                                                                  bits).items()})
    return tensors


def dir_bytes(path):
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def verify_reload(out, results):
    """Reload the written checkpoint with our loader; its dequantized weights must equal GPTQ's Q exactly."""
    model, _ = load(out)
    for name, res in results.items():
        got = model.get_submodule(name).weight_dequantized()
        if not torch.equal(got, res.dequantize()):
            raise RuntimeError(f"{out}: {name} reloads to different weights (max diff "
                               f"{(got - res.dequantize()).abs().max():.3g})")
    return model_bytes(model)


# ---------------------------------------------------------------- driver and CLI

def run(ckpt, out, method="gptq", bits=4, group_size=128, sym=False, act_order=False, blocksize=128,
                        percdamp=0.01, calib="wikitext2", nsamples=128, seqlen=2048, seed=0, save_dtype="float16",
                        data_dir=None, json_out=None, device=None, dtype=None, devices=None, offload=False):
    """Load `ckpt`, quantize its Linears, write a GPTQ-layout checkpoint to `out` and a JSON report; returns it.

    `dtype` is the compute dtype (as in every tool), `save_dtype` the stored dtype of the unquantized tensors,
    `json_out` the report's path (None: OUT/quantize_report.json)."""
    t_start = time.perf_counter()
    torch.manual_seed(seed)
    placement.refuse_random(ckpt, "--ckpt", "a quantized checkpoint of them would mean nothing "
                                            "(benchmarks/gpu_check.py measures GPTQ's memory on random: models)")
    src = resolve(ckpt)
    raw = read_config_dict(src)
    check_flags(raw, bits, group_size, blocksize, percdamp, method, nsamples)
    atomic.check_out(out, {"--ckpt": src})
    atomic.check_out(json_out, {"--ckpt": src, "--out": out}, "--json", kind="file")
    with torch.device("meta"):  # the Linears' shapes from config.json alone, before the weights load
        check_linears(Transformer(placement.config(src)), group_size)
    model, tok, devs, _ = placement.load_placed(src, device, dtype, devices, offload)
    ram_dense = model_bytes(model)
    tokens, calib_desc = None, None
    if nsamples > 0:
        if tok is None:
            raise UserError(f"{src} has no tokenizer: calibration text cannot be encoded")
        tokens, _, calib_desc = calibration_windows(tok, calib, nsamples, min(seqlen, model.cfg.max_position_embeddings),
                                                    seed, data_dir=data_dir)
        print(f"calibration: {calib_desc}")
        check_calibration(tokens, max(model.layers[0].get_submodule(n).in_features for n in LINEARS))
    settings = dict(method=method, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                    blocksize=blocksize, percdamp=percdamp)
    print(f"quantizing {shown(src)} with {method}: {bits} bits, group size {group_size}, "
          f"{'symmetric' if sym else 'asymmetric'}{', act-order (static groups)' if act_order else ''}")
    t0 = time.perf_counter()
    work = resume.OFF
    if tokens is not None:
        # finished layers wait beside the output: a rerun with the same settings continues from them
        work = resume.LayerStore(resume.gptq_work_dir(out), dict(settings, source=str(src), calib=calib_desc,
                                                                 nsamples=nsamples, seqlen=seqlen, seed=seed))
    results, rows = quantize_model(model, tokens, settings, work=work)
    quant_seconds = time.perf_counter() - t0
    peak = peak_memory(devs)
    config = dict(raw, quantization_config=quantization_config(bits, group_size, sym, act_order, percdamp, method),
                  torch_dtype=save_dtype)
    save_checkpoint(out, config, packed_tensors(model, results, bits, DTYPES[save_dtype]), source_dir=src)
    ram_quant = verify_reload(out, results)
    work.remove()
    rep = {**atomic.provenance(seed), "source": str(src), "out": str(out), "settings": settings, "dtype_unquantized": save_dtype,
           "calibration": None if tokens is None else {"text": calib_desc, "nsamples": tokens.shape[0],
                                                       "seqlen": tokens.shape[1], "tokens": tokens.numel()},
           "quantize_seconds": quant_seconds, "wall_seconds": time.perf_counter() - t_start,
           "placement": placement.describe_split(model), "peak_memory_bytes": peak,
           "bytes": {"disk_source": dir_bytes(src), "disk_quantized": dir_bytes(out),
                     "ram_source": ram_dense, "ram_quantized": ram_quant},
           "proxy_error_total": sum(r["proxy_error"] for r in rows) if rows else None,
           "proxy_error_total_rtn": sum(r["proxy_error_rtn"] for r in rows) if rows else None,
           "layers": rows}
    write_json(Path(json_out) if json_out else Path(out) / "quantize_report.json", rep)
    b = rep["bytes"]
    print(f"wrote {out}: weights on disk {b['disk_source']:,} -> {b['disk_quantized']:,} bytes, in RAM "
          f"{b['ram_source']:,} -> {b['ram_quantized']:,} bytes; quantization {quant_seconds:,.1f}s")
    return rep


def memory_plan(a, cfg, path, placed):
    """quantize.py's flags -> memory.py's plan of GPTQ (plan.py calls it)."""
    return memory.plan_gptq(*placed, a["nsamples"], min(a["seqlen"], cfg.max_position_embeddings), a["bits"])


def build_parser():
    """The command line, built without running anything (tests/test_docs.py reads its flags)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="smollm2-135m", help="checkpoint to quantize: directory or short name")
    p.add_argument("--out", type=Path, required=True, help="directory for the quantized checkpoint")
    p.add_argument("--method", default="gptq", choices=["gptq", "rtn"], help="GPTQ or round-to-nearest")
    p.add_argument("--bits", type=int, default=4, choices=SUPPORTED_BITS, help="bits per weight")
    p.add_argument("--group-size", type=int, default=128, help="input columns per scale/zero; -1: per channel")
    p.add_argument("--sym", action="store_true", help="symmetric grid, zero = 2^(bits-1), not min-max")
    p.add_argument("--act-order", action="store_true", help="GPTQ: columns by decreasing diag(H); static groups")
    p.add_argument("--blocksize", type=int, default=128, help="GPTQ: columns per lazy batch update (exact)")
    p.add_argument("--percdamp", type=float, default=0.01, help="GPTQ: damping of H, fraction of mean diag(H)")
    p.add_argument("--calib", default="wikitext2", help="wikitext2 (validation split), pydoc or a file")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows; 0 (rtn only): no data")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing the calibration windows")
    p.add_argument("--save-dtype", default="float16", choices=list(DTYPES),
                   help="dtype in which the unquantized tensors (embeddings, norms, head) are written (before: --dtype, "
                        "which now is the compute dtype, as in every tool)")
    p.add_argument("--data-dir", type=Path, default=None, help="data directory; None: $CLP_DATA, then ./data")
    p.add_argument("--json", type=Path, default=None, dest="json_out", metavar="OUT",
                   help="write the JSON report to this file; None: OUT/quantize_report.json")
    old_spelling(p, "--report", "--json")
    devices.add_arguments(p)
    old_spelling(p, "--compute-dtype", "--dtype")
    plan.add_args(p)
    return p


def parse_args(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if a.act_order and a.method == "rtn":
        p.error("--act-order only changes GPTQ; RTN has no column order")
    if a.method == "gptq" and a.nsamples < 1:
        p.error("GPTQ needs calibration data: --nsamples must be >= 1")
    return a


@cli(memory="--nsamples or --seqlen", resume="the finished layers are kept in OUT.partial; the same command continues from them")
def main(argv=None):
    a = parse_args(argv)
    plan.check(a, "quantize", memory_plan)
    run(**vars(a))


if __name__ == "__main__":
    main()
