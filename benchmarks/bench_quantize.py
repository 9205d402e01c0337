"""GPTQ against round-to-nearest on the dense and the depth-pruned model: perplexity, bytes, wall time.

    python benchmarks/bench_quantize.py --prune-layers 18-26
    python benchmarks/bench_quantize.py --pruned runs/clp-30 --tuned runs/clp-30-tuned

For every model (dense, pruned, and the endpoint-tuned one when given) and every setting
(bits, group size), quantizes with RTN (data-free) and GPTQ through quantize.run,
reloads the written checkpoint with our loader and measures WikiText-2 test perplexity with eval.py on
the first --windows windows of --seqlen tokens (the same windows for every row). GPTQ runs once per
calibration seed (--seeds) and its row reports the mean and the spread over seeds: on a 135M model,
4-bit perplexity moves by several percent between calibration draws, so one seed cannot rank methods.
RTN uses no data, so one run is its figure. Writes the "quantize" section of BENCHMARKS.md and a JSON
file. Finished runs are cached in --work/results.json, so an interrupted run resumes; --fresh recomputes.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import PPL, command, heavy, load_cells, store_cell, update_section  # noqa: E402

import load_weights  # noqa: E402
from model import LINEARS  # noqa: E402
from machinery.atomic import write_json  # noqa: E402
from latency import model_bytes  # noqa: E402
from quantize import dir_bytes, run as quantize_run  # noqa: E402


METHODS = {"rtn": "RTN", "gptq": "GPTQ", "gptq-act": "GPTQ+act"}


def parse_settings(spec):
    """'4:-1,4:128,3:128' -> [(4, -1), (4, 128), (3, 128)]"""
    return [tuple(int(v) for v in part.split(":")) for part in spec.split(",")]


def linear_bytes(model):
    """Bytes held by the quantized Linears of all Blocks (weights or packed buffers, scales, zeros, g_idx)."""
    total = 0
    for layer in model.layers:
        for name in LINEARS:
            m = layer.get_submodule(name)
            total += sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    return total


def measure(ckpt, ppl):
    # the reference path holds the format tensors alone, so RAM counts what the format costs (quant_paths.py
    # adds a runtime form on the faster paths); perplexity is the same on every path
    model, _ = load_weights.load(ckpt, quant_path="reference")
    return {"ppl": ppl(model), "disk": dir_bytes(load_weights.resolve(ckpt)), "ram": model_bytes(model),
            "linear_ram": linear_bytes(model)}


def quantized_row(src, out, method, bits, group_size, seed, a, ppl):
    shown = a.ckpt if Path(src) == load_weights.resolve(a.ckpt) else src
    act = method == "gptq-act"
    method = "gptq" if act else method
    rep = quantize_run(src, out, method=method, bits=bits, group_size=group_size, act_order=act,
                              nsamples=a.nsamples if method == "gptq" else 0, seqlen=a.calib_seqlen, seed=seed or 0,
                              calib="wikitext2", data_dir=a.data_dir)
    row = measure(out, ppl)
    row.update(seconds=rep["quantize_seconds"], proxy=rep["proxy_error_total"], proxy_rtn=rep["proxy_error_total_rtn"],
               command=f"python quantize.py --ckpt {shown} --method {method} --bits {bits} --group-size {group_size} "
                       + (f"--nsamples {a.nsamples} --seqlen {a.calib_seqlen} --seed {seed} " if method == "gptq" else "--nsamples 0 ")
                       + ("--act-order " if act else "")
                       + f"--out {out}")
    return row


def pruned_label(path):
    """'pruned 30%: layers 12-20 of 30 removed (exhaustive)' from the checkpoint's pruning.json, if it has one."""
    info = path / "pruning.json"
    if not info.is_file():
        return f"pruned ({path.name})"
    p = json.loads(info.read_text())
    r, L = p["removed_layers"], p["source_num_layers"]
    span = f"{r[0]}-{r[-1]}" if r == list(range(r[0], r[-1] + 1)) else ",".join(map(str, r))
    return f"pruned {len(r) / L:.0%}: layers {span} of {L} removed ({p.get('method', '?')})"


def prepare_models(a):
    """[(label, checkpoint directory)]: dense, pruned (excised here from --prune-layers unless --pruned), tuned."""
    dense = load_weights.resolve(a.ckpt)
    if a.pruned:
        pruned, plabel = Path(a.pruned), pruned_label(Path(a.pruned))
    else:
        import excise

        pruned = a.work / f"pruned-{a.prune_layers}"
        if not (pruned / "config.json").is_file():
            with heavy(a.lock):
                excise.run(a.ckpt, pruned, layers=a.prune_layers)
        plabel = pruned_label(pruned)
    models = {"dense": (f"{a.ckpt} (dense)", dense), "pruned": (plabel, pruned)}
    if a.tuned:
        models["tuned"] = (f"{plabel}, endpoint-tuned ({Path(a.tuned).name})", Path(a.tuned))
    a.models = a.models or ",".join(models)
    unknown = set(a.models.split(",")) - set(models)
    if unknown:
        raise SystemExit(f"--models {a.models}: no {', '.join(sorted(unknown))} model (known here: {', '.join(models)})")
    return [models[m] for m in a.models.split(",")]


def seeds_of(method, a):
    # only GPTQ draws calibration windows; RTN and the source checkpoint have nothing to vary
    return a.seeds if method.startswith("gptq") else [None]


def run(a):
    """One row per run: (model, method, bits, group size, seed); GPTQ once per calibration seed."""
    a.work.mkdir(parents=True, exist_ok=True)
    cache_file = a.work / "results.json"
    if a.fresh:
        cache_file.unlink(missing_ok=True)
    cache = load_cells(cache_file)
    models = prepare_models(a)
    _, tok = load_weights.load(models[0][1])
    ppl = PPL(tok, a.windows, a.seqlen, a.data_dir)
    print(f"perplexity on the first {ppl.windows.shape[0]} of {ppl.total} windows of {a.seqlen} tokens ({ppl.desc})")
    rows = []
    for label, src in models:
        jobs = [("fp32", None, None)] + [(m, b, g) for b, g in a.settings for m in a.methods.split(",")]
        for method, bits, gs in jobs:
            for seed in seeds_of(method, a):
                key = f"{src}|{method}|{bits}|{gs}|{a.windows}|{a.seqlen}|{a.nsamples}|{a.calib_seqlen}"
                key += "" if seed is None else f"|seed{seed}"
                if key not in cache and a.cached_only:
                    print(f"{label} {method} {bits} {gs} seed {seed}: not in the cache, left out (--cached-only)")
                    continue
                if key not in cache:
                    with heavy(a.lock):
                        t0 = time.perf_counter()
                        if method == "fp32":
                            row = dict(measure(src, ppl), seconds=None, command=f"(source checkpoint {src})")
                        else:
                            out = a.work / (f"{Path(src).name}-{method}-{bits}b-g{gs}"
                                            + ("" if seed is None else f"-s{seed}"))
                            row = quantized_row(src, out, method, bits, gs, seed, a, ppl)
                    store_cell(cache_file, cache, key, row)
                    print(f"{label} {method} {bits} {gs} seed {seed}: ppl {row['ppl']:.3f} "
                          f"({time.perf_counter() - t0:,.0f}s)", flush=True)
                rows.append(dict(cache[key], model=label, method=method, bits=bits, group_size=gs, seed=seed))
    return rows, ppl


def spread_rows(rows):
    """One row per (model, method, bits, group size): perplexity mean, sample s.d. and min..max over seeds."""
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"], r["bits"], r["group_size"]), []).append(r)
    out = []
    for runs in groups.values():
        p = [r["ppl"] for r in runs]
        sec = [r["seconds"] for r in runs if r["seconds"] is not None]
        out.append(dict(runs[0], ppl=statistics.mean(p), ppl_sd=statistics.stdev(p) if len(p) > 1 else None,
                        ppl_min=min(p), ppl_max=max(p), ppl_runs=p, n=len(p),
                        seconds=statistics.mean(sec) if sec else None, commands=[r["command"] for r in runs]))
    return out


def fmt_setting(r):
    if r["method"] == "fp32":
        return "fp32 (no quantization)"
    return f"{r['bits']}-bit, {'per-channel' if r['group_size'] == -1 else 'g' + str(r['group_size'])}"


def verdicts(rows):
    """For every model and setting: does GPTQ beat RTN in perplexity on every calibration seed (its worst one)?"""
    out = []
    for r in rows:
        rtn = [x for x in rows if x["model"] == r["model"] and x["method"] == "rtn"
               and x["bits"] == r["bits"] and x["group_size"] == r["group_size"]]
        if r["method"].startswith("gptq") and rtn:
            out.append((r["model"], fmt_setting(r) + " " + r["method"], rtn[0]["ppl"], r["ppl_max"],
                        r["ppl_max"] < rtn[0]["ppl"]))
    return out


def fmt_ppl(r):
    if r["n"] == 1:
        return f"{r['ppl']:,.3f}"
    return f"{r['ppl']:,.3f} ± {r['ppl_sd']:,.3f} ({r['ppl_min']:,.2f}-{r['ppl_max']:,.2f})"


def markdown(rows, ppl, a):
    mb = lambda b: f"{b / 1e6:,.1f}"  # noqa: E731
    lines = [
        f"## {a.title}",
        "",
        f"Command: `{command()}`",
        "",
        *(["Written with --cached-only: every figure below comes from a run of this script with the same settings "
           "cached in WORK/results.json (the commands of the quantized rows are listed at the end); runs not "
           "finished there are left out, so a row's *seeds* column says how many calibration draws it holds.", ""]
          if a.cached_only else []),
        f"Perplexity: WikiText-2 raw test ({ppl.desc}), **first {ppl.windows.shape[0]} of {ppl.total} windows of "
        f"{a.seqlen} tokens** (a subset, the same for every row; eval.py's protocol otherwise). "
        f"GPTQ calibration: {a.nsamples} random windows of {a.calib_seqlen} tokens "
        f"({a.nsamples * a.calib_seqlen:,} tokens) of the WikiText-2 *validation* text, drawn with each of the "
        f"{len(a.seeds)} seeds {', '.join(map(str, a.seeds))}; "
        f"asymmetric min-max grids, dampening 0.01, blocksize 128"
        + ("; *GPTQ+act* adds act-order (columns in order of decreasing Hessian diagonal) with static groups"
           if "gptq-act" in a.methods else ", no act-order") + ". RTN uses the same grids and no data. "
        "Quantized checkpoints store embeddings and norms in fp16 (the GPTQ convention); they load back as fp32. "
        "Bytes: *disk* = all safetensors files; *RAM* = every parameter and buffer of the loaded model "
        "(tied head once); *Linear RAM* = the 7 Linears of every Block only (what GPTQ compresses). "
        "Time: the quantization loop (for GPTQ incl. the calibration forward passes), not loading or saving "
        "(mean over seeds). Perplexity of GPTQ rows: mean ± sample standard deviation (min-max) over the seeds; "
        "RTN and fp32 use no calibration data, so one run is exact.",
        "",
        "| model | setting | method | WikiText-2 ppl | seeds | disk MB | RAM MB | Linear RAM MB | quantize s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in spread_rows(rows):
        sec = "" if r["seconds"] is None else f"{r['seconds']:,.1f}"
        lines.append(f"| {r['model']} | {fmt_setting(r)} | {METHODS.get(r['method'], '-')} | {fmt_ppl(r)} | "
                     f"{r['n'] if r['method'].startswith('gptq') else '-'} | {mb(r['disk'])} | {mb(r['ram'])} | "
                     f"{mb(r['linear_ram'])} | {sec} |")
    v = verdicts(spread_rows(rows))
    lost = [f"{m}, {s} (RTN {x:.3f}, worst GPTQ seed {y:.3f})" for m, s, x, y, ok in v if not ok]
    lines += ["", f"GPTQ beats RTN on every seed in {sum(ok for *_, ok in v)} of {len(v)} comparisons "
              "(same model and setting)" + (f"; not in: {'; '.join(lost)}." if lost else ".")]
    lines += ["", "Commands of the quantized rows (run by the script through `quantize.run`):", ""]
    lines += [f"- `{r['command']}`" for r in rows if r["method"] != "fp32"]
    return "\n".join(lines)


def build_parser():
    """The command line, built without running anything (tests/test_docs.py reads its flags)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="smollm2-135m", help="dense checkpoint")
    p.add_argument("--prune-layers", default="18-26", help="block removed (excise.py) to make the pruned model")
    p.add_argument("--pruned", type=Path, default=None, help="an existing pruned checkpoint to use instead of --prune-layers")
    p.add_argument("--tuned", type=Path, default=None, help="an endpoint-tuned pruned checkpoint to add (tune.py)")
    p.add_argument("--settings", type=parse_settings, default="4:-1,4:128,3:128", help="bits:group_size list")
    p.add_argument("--windows", type=int, default=20, help="perplexity windows used (the first ones of the test text)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per perplexity window")
    p.add_argument("--nsamples", type=int, default=32, help="GPTQ calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default="0,1,2",
                   help="comma-separated seeds of the calibration windows; GPTQ runs once per seed")
    p.add_argument("--data-dir", type=Path, default=None, help="data directory; None: $CLP_DATA, then ./data")
    p.add_argument("--work", type=Path, default=Path("runs/bench_quantize"), help="checkpoints and the results cache")
    p.add_argument("--json", type=Path, default=Path("runs/bench_quantize/bench_quantize.json"), help="JSON output")
    p.add_argument("--fresh", action="store_true", help="ignore cached rows in WORK/results.json")
    p.add_argument("--lock", default="/tmp/clp-heavy.lock", help="lock file held during each row; '' for none")
    p.add_argument("--methods", default="rtn,gptq", help="comma-separated methods: rtn, gptq, gptq-act (GPTQ with act-order)")
    p.add_argument("--models", default=None, help="comma-separated subset of dense,pruned,tuned to run; None: all given")
    p.add_argument("--section", default="quantize", help="the BENCHMARKS.md section to rewrite")
    p.add_argument("--title", default="Quantization: GPTQ vs round-to-nearest (quantize.py)", help="heading of the section")
    p.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    p.add_argument("--cached-only", action="store_true", help="write the section from the finished runs in the cache only")
    return p


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if a.pruned and a.prune_layers != p.get_default("prune_layers"):
        p.error("give either --pruned or --prune-layers, not both")
    a.lock = a.lock or None
    torch.manual_seed(a.seeds[0])
    rows, ppl = run(a)
    md = markdown(rows, ppl, a)
    print(md)
    write_json(a.json, {"command": command(), "rows": rows, "summary": spread_rows(rows), "windows": a.windows,
                        "seqlen": a.seqlen, "seeds": a.seeds})
    if not a.no_write:
        update_section(a.section, md)


if __name__ == "__main__":
    main()
