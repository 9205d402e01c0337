"""The measuring instrument: perplexity, KL to a reference model, zero-shot multiple choice, latency,
and the dense-vs-pruned report.

    python eval.py --ckpt smollm2-135m --ppl wikitext2 --seqlen 2048 --json out.json
    python eval.py --ckpt smollm2-135m --tasks piqa,winogrande,arc_easy --limit 500
    python eval.py --ckpt DENSE --compare PRUNED --ppl wikitext2 --tasks all --latency --json cmp.json

Protocols (docs/protocols.md; never change them silently):
- Perplexity: the text is tokenized once (BOS only where the family's tokenizer adds one), cut into
  non-overlapping windows of `seqlen` tokens, the tail dropped; each window predicts its tokens 2..T from
  the ones before; ppl = exp(mean NLL over all predicted tokens).
- KL: mean over the same windows and all T positions of KL(p_teacher || p_model), in nats.
- Zero-shot (zeroshot.py): lm-evaluation-harness loglikelihood scoring with its prompt formats (tasks.py);
  acc = argmax of the summed log-prob of each choice, acc_norm = the same divided by the choice's characters.
- Latency (latency.py): batch 1; prefill of `seqlen` tokens; decode of `new_tokens` tokens with the static KV
  cache after a 128-token prompt; the models of a --compare timed in turn (dense, pruned, dense, pruned, ...)
  over `warmup` untimed and `runs` timed rounds; medians with min/max and IQR; speedups are ratios of medians,
  printed beside the ideal L/(L-k); decode also as a fraction of the memory-bandwidth roofline measured in the
  same rounds; the device synchronized before each clock read; the CPU thread count fixed and recorded.
"""
import argparse
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import latency as lat
import load_weights
import quant_paths
import tasks as task_files
from data import eval_windows, find_data_dir, load_text
from machinery import atomic, devices, memory, placement, plan
from machinery.atomic import write_json
from machinery.errors import UserError, cli
from zeroshot import Progress, run_task


# ---------------------------------------------------------------- perplexity and KL

def chunked_nll(logits, tokens, chunk=256):
    """Summed NLL of tokens[1:] given logits[:-1]; logits (T, V), tokens (T,); softmax `chunk` rows at a time."""
    T, total = tokens.shape[0], 0.0
    for s in range(0, T - 1, chunk):
        e = min(s + chunk, T - 1)
        logp = F.log_softmax(logits[s:e].float(), dim=-1)  # (c, V)
        total -= logp.gather(-1, tokens[s + 1:e + 1, None].to(logp.device)).sum().item()
    return total


def chunked_kl(logits_t, logits_m, chunk=256):
    """Summed KL(p_t || p_m) = sum_v p_t (log p_t - log p_m) over the rows of (T, V) logits, `chunk` rows at a time,
    so that only (chunk, V) temporaries exist even for 128k-token vocabularies."""
    total = 0.0
    for s in range(0, logits_t.shape[0], chunk):
        logp_t = F.log_softmax(logits_t[s:s + chunk].float(), dim=-1)  # (c, V)
        logp_m = F.log_softmax(logits_m[s:s + chunk].float(), dim=-1)  # (c, V)
        total += (logp_t.exp() * (logp_t - logp_m)).sum().item()
    return total


@torch.no_grad()
def text_metrics(model, windows, teacher=None, chunk=256, device="cpu", label="ppl"):
    """Perplexity of `model` on windows (n, T), and with a teacher also the mean KL(p_teacher || p_model)
    and the teacher's own perplexity (a free by-product of its forward passes)."""
    n, T = windows.shape
    nll = nll_t = kl = 0.0
    prog = Progress(label, n, "windows")
    for i in range(n):
        x = windows[i:i + 1].to(device)  # (1, T)
        logits = model(x)[0]  # (T, V)
        nll += chunked_nll(logits, x[0], chunk)
        if teacher is not None:
            logits_t = teacher(x)[0]  # (T, V)
            nll_t += chunked_nll(logits_t, x[0], chunk)
            kl += chunked_kl(logits_t, logits, chunk)
        prog.update(i + 1, f", ppl so far {math.exp(nll / ((i + 1) * (T - 1))):,.3f}")
    out = {"ppl": math.exp(nll / (n * (T - 1))), "windows": n, "seqlen": T, "predicted_tokens": n * (T - 1)}
    if teacher is not None:
        out.update(kl=kl / (n * T), teacher_ppl=math.exp(nll_t / (n * (T - 1))))
    return out


# ---------------------------------------------------------------- one model, two models

def ppl_key(source, desc):
    # the key names the text really used: the embedded fallback never poses as "wikitext2"
    return desc.split()[0] if desc.startswith("pydoc") else str(source)


def text_windows(tok, sources, seqlen, data_dir, bos, max_windows=None):
    """{key: (windows (n, seqlen), description)} for each perplexity text, tokenized once; with `max_windows`
    only the first windows (a subset that the description states)."""
    if sources and tok is None:
        raise UserError("perplexity needs a tokenizer; this checkpoint has none")
    out = {}
    for src in sources:
        text, desc = load_text(src, "test", data_dir)
        windows, key = eval_windows(tok.encode(text, bos=bos), seqlen), ppl_key(src, desc)
        if max_windows is not None and max_windows < len(windows):
            # a subset never poses as the full-set figure: its key says which windows
            desc = f"{desc}, first {max_windows} of {len(windows)} windows (a subset)"
            windows, key = windows[:max_windows], f"{key}[:{max_windows}]"
        out[key] = (windows, desc)
    return out


def evaluate(model, tok, ckpt, *, ppl=(), ppl_windows=None, teacher=None, tasks=(), limit=None, latency_runs=0, seqlen=2048,
             new_tokens=128, batch_size=8, kl_chunk=256, bos="auto", data_dir=None, device="cpu", **latency_opts):
    """One model's results in the JSON schema (docs/protocols.md): ckpt, ppl, kl, tasks, latency, settings."""
    seqlen = min(seqlen, model.cfg.max_position_embeddings)
    use_bos = bos == "always" or (bos == "auto" and tok is not None and tok.add_bos)
    res = {"ckpt": str(ckpt), "ppl": {}, "kl": {}, "tasks": {}, "latency": None,
           "settings": {"seqlen": seqlen, "bos": use_bos, "layers": model.cfg.num_layers, "data": {}}}
    if teacher is not None and teacher.cfg.vocab_size != model.cfg.vocab_size:
        raise UserError(f"teacher vocabulary {teacher.cfg.vocab_size:,} != model vocabulary {model.cfg.vocab_size:,}")
    for key, (windows, desc) in text_windows(tok, ppl, seqlen, data_dir, use_bos, ppl_windows).items():
        print(f"{ckpt}: perplexity on {desc}, {windows.shape[0]:,} windows of {seqlen:,} tokens")
        m = text_metrics(model, windows, teacher, kl_chunk, device, label=f"ppl {key}")
        res["ppl"][key] = m.pop("ppl")
        if teacher is not None:
            res["kl"][key] = m.pop("kl")
        res["settings"]["data"][key] = dict(m, text=desc)
    if tasks:
        if tok is None:
            raise UserError("zero-shot tasks need a tokenizer; this checkpoint has none")
        root = find_data_dir(data_dir)
        if root is None:
            raise FileNotFoundError("zero-shot tasks need the data directory: set CLP_DATA or pass --data-dir")
        res["settings"]["task_data"] = str(root)
        for name in tasks:
            res["tasks"][name] = run_task(model, tok, name, root, limit, use_bos, batch_size, device)
    if latency_runs:
        print(f"{ckpt}: latency, prefill {seqlen:,} tokens, decode {new_tokens} tokens, median of {latency_runs} runs")
        res["latency"] = lat.one_model(model, seqlen, new_tokens, latency_runs, device, **latency_opts)
    return res


def ratio(a, b):
    return a / b if a is not None and b else None


# a task scored on fewer items (the 4-item HellaSwag smoke sample) stays out of the mean retention: one standard
# error of its accuracy is over 11 points, more than the differences the mean is read for
MIN_ITEMS_IN_MEAN = 20


def compare_block(dense, pruned):
    """Retention per task (pruned / dense on the task's primary metric), its mean over the tasks scored on at least
    MIN_ITEMS_IN_MEAN items (the others are listed in retention_mean_excludes), and speedups vs the ideal L/(L-k)."""
    ret = {t: ratio(pruned["tasks"][t][task_files.PRIMARY[t]], dense["tasks"][t][task_files.PRIMARY[t]])
           for t in dense["tasks"]}
    excluded = {t: f"{dense['tasks'][t]['n']} items, fewer than {MIN_ITEMS_IN_MEAN}" for t in ret
                if dense["tasks"][t]["n"] < MIN_ITEMS_IN_MEAN}
    valid = [v for t, v in ret.items() if v is not None and t not in excluded]
    L, Lp = dense["settings"]["layers"], pruned["settings"]["layers"]
    sp = lat.speedups(dense["latency"], pruned["latency"]) if dense["latency"] and pruned["latency"] else {}
    return {"retention": ret, "retention_mean": statistics.mean(valid) if valid else None,
            "retention_mean_excludes": excluded,
            "retention_metric": {t: task_files.PRIMARY[t] for t in ret}, "layers": [L, Lp], "ideal_speedup": L / Lp,
            "prefill_speedup": sp.get("prefill"), "decode_speedup": sp.get("decode")}


def fmt(v, spec=",.4f"):
    return "-" if v is None else format(v, spec)


def table_rows(res):
    """(label, value) rows of one result, formatted."""
    rows = [(f"ppl {k}", fmt(v, ",.3f")) for k, v in res["ppl"].items()]
    rows += [(f"KL {k} (nats/token)", fmt(v, ".5f")) for k, v in res["kl"].items()]
    for t, m in res["tasks"].items():
        rows += [(f"{t} acc (n={m['n']:,})", fmt(m["acc"])), (f"{t} acc_norm", fmt(m["acc_norm"]))]
    if res["latency"]:
        la = res["latency"]
        rng = lambda d, n, f: f"{n / d['max']:{f}}-{n / d['min']:{f}}"  # noqa: E731  (tok/s range over the runs)
        rows += [("prefill tok/s (median)", fmt(la["prefill_tok_s"], ",.1f")),
                 ("  prefill min-max over runs", rng(la["prefill_s"], la["seqlen"], ",.0f")),
                 ("decode tok/s (median)", fmt(la["decode_tok_s"], ",.2f")),
                 ("  decode min-max over runs", rng(la["decode_s"], la["new_tokens"], ",.1f")),
                 ("decode / bandwidth roofline", fmt(la["roofline_fraction"], ".1%")),
                 ("weight MB read per token", fmt(la["weight_bytes_per_token"] / 1e6, ",.1f")),
                 ("peak memory MiB", fmt(la["peak_mem_bytes"] / 2**20, ",.0f"))]
    return rows + [("layers", str(res["settings"]["layers"]))]


def print_table(res, dense=None, cmp=None):
    """One column per model; with a dense reference, a ratio column and the retention / speedup summary."""
    print()
    if dense is None:
        print(f"{'':34}{res['ckpt'][-24:]:>24}")
        for label, v in table_rows(res):
            print(f"{label:34}{v:>24}")
        return
    dense_rows = dict(table_rows(dense))
    print(f"{'':34}{'dense':>16}{'pruned':>16}")
    for label, v in table_rows(res):
        print(f"{label:34}{dense_rows.get(label, '-'):>16}{v:>16}")
    for t, r in cmp["retention"].items():
        print(f"{'retention ' + t + ' (' + cmp['retention_metric'][t] + ')':50}{fmt(r):>16}")
    left_out = "; ".join(f"{t}: {why}" for t, why in cmp["retention_mean_excludes"].items())
    print(f"{'retention mean':50}{fmt(cmp['retention_mean']):>16}" + (f"  without {left_out}" if left_out else ""))
    ideal = f"ideal L/(L-k) = {cmp['layers'][0]}/{cmp['layers'][1]} = {cmp['ideal_speedup']:.3f}"
    print(f"{'prefill speedup (ratio of medians)':50}{fmt(cmp['prefill_speedup'], '.3f'):>16}  {ideal}")
    print(f"{'decode speedup (ratio of medians)':50}{fmt(cmp['decode_speedup'], '.3f'):>16}  {ideal}")


def load_model(ckpt, place, decode=False):
    print(f"loading {ckpt}")
    model, tok, devs, dt = placement.load_placed(ckpt, **place)
    if decode and not place["offload"]:
        load_weights.decode_layout(model)  # latency runs decode: the faster CPU layout (docs/speed.md)
    return model, tok, str(devs[0]), str(dt).removeprefix("torch.")


def check_json_out(json_out, inputs):
    """Before anything loads: --json must be a file path outside every checkpoint directory it measures."""
    if json_out is None:
        return
    # the inputs given as directories (a name's cached copy is no place a user would write to)
    dirs = {flag: c for flag, c in inputs.items() if c and Path(c).expanduser().is_dir()}
    atomic.check_out(json_out, dirs, "--json", kind="file")


def run(ckpt, compare=None, teacher=None, ppl=(), ppl_windows=None, tasks=(), limit=None, latency=False, seqlen=2048, batch_size=8,
        kl_chunk=256, runs=5, warmup=1, new_tokens=128, compile=False, probe_mbytes=256, quant_path="auto", bos="auto",
        threads=None, dtype=None, device=None, devices=None, offload=False, data_dir=None, json_out=None):
    """Evaluate `ckpt` (and `compare` against it); print the table; write the JSON result. Returns the result."""
    t0 = time.perf_counter()
    check_json_out(json_out, {"--ckpt": ckpt, "--compare": compare, "--teacher": teacher})
    place = dict(device=device, dtype=dtype, devices=devices, offload=offload, quant_path=quant_path)
    model, tok, device, dtype = load_model(ckpt, place, decode=latency)
    opts = dict(tasks=tasks, limit=limit, seqlen=seqlen, new_tokens=new_tokens,
                batch_size=batch_size, kl_chunk=kl_chunk, bos=bos, data_dir=data_dir, device=device)
    lat_opts = dict(warmup=warmup, probe_mbytes=probe_mbytes, compile=compile)
    if compare is None:
        ref = load_model(teacher, place)[0] if teacher else None
        res = evaluate(model, tok, ckpt, ppl=ppl, ppl_windows=ppl_windows, teacher=ref,
                       latency_runs=runs if latency else 0, **opts, **lat_opts)
        print_table(res)
    else:
        pruned, ptok = load_model(compare, place, decode=latency)[:2]
        # the dense model is the KL teacher; its perplexity comes out of the same forward passes
        res = evaluate(pruned, ptok, compare, ppl=ppl, ppl_windows=ppl_windows, teacher=model, **opts)
        dense = evaluate(model, tok, ckpt, **opts)
        for key, m in res["settings"]["data"].items():
            dense["ppl"][key] = m.pop("teacher_ppl")
            dense["settings"]["data"][key] = dict(m)
        if latency:
            dense["latency"], res["latency"] = lat.two_models(model, pruned, seqlen, new_tokens, runs, device, **lat_opts)
        res.update(reference=dense, compare=compare_block(dense, res))
        print_table(res, dense, res["compare"])
    if res["latency"]:
        lat.print_note(res["latency"])
    made = atomic.provenance(seed=0)  # the eval.py schema keeps them in settings (docs/protocols.md)
    res["settings"].update(
        command=made["command"], teacher=str(ckpt) if compare else teacher, limit=limit,
        batch_size=batch_size, kl_chunk=kl_chunk, runs=runs, warmup=warmup, compile=compile,
        new_tokens=new_tokens, dtype=dtype, device=device, devices=devices, offload=offload,
        threads=torch.get_num_threads(), seed=made["seed"], **made["versions"],
        wall_s=round(time.perf_counter() - t0, 1))
    if placement.mark_random(res, ckpt, compare, teacher).get("random_weights"):
        print(f"note: {res['random_weights']}")
    if json_out:
        write_json(json_out, res)
        print(f"wrote {json_out}")
    return res


def memory_plan(a, cfg, path, placed):
    """eval.py's flags -> memory.py's plan of evaluating the model and its --compare / --teacher (plan.py calls it)."""
    cfgs = [cfg] + [plan.config(a[key])[0] for key in ("compare", "teacher") if a[key]]
    return memory.plan_eval(cfgs, *placed[1:], min(a["seqlen"], cfg.max_position_embeddings), a["kl_chunk"])


def build_parser():
    """The command line, built without running anything (tests/test_docs.py reads its flags)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", metavar="CKPT", default=load_weights.DEFAULT, help="checkpoint to evaluate (name or HF-layout directory); the dense side in --compare")
    p.add_argument("--compare", metavar="PRUNED", default=None, help="pruned checkpoint: evaluate both, KL of it to --ckpt, one dense-vs-pruned table")
    p.add_argument("--teacher", metavar="CKPT", default=None, help="reference checkpoint for KL(p_teacher || p_model) on the perplexity windows")
    p.add_argument("--ppl", nargs="+", default=[], metavar="TEXT", help="perplexity texts: wikitext2, pydoc, or text files")
    p.add_argument("--ppl-windows", type=int, default=None, metavar="N",
                   help="perplexity on the first N windows only (stated as a subset); None: the whole text")
    p.add_argument("--tasks", default=None, help=f"comma-separated zero-shot tasks or 'all': {','.join(task_files.TASKS)}")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N items of each task; None: all")
    p.add_argument("--latency", action="store_true", help="measure prefill and decode tokens/s and peak memory")
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window and prefill length, capped at the model's maximum")
    p.add_argument("--batch-size", type=int, default=8, help="choice sequences per forward pass in zero-shot scoring")
    p.add_argument("--kl-chunk", type=int, default=256, help="positions per softmax chunk in NLL and KL")
    p.add_argument("--runs", type=int, default=5, help="timed latency rounds (each times every model once); medians reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed latency rounds before the timed ones")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode steps of the latency runs")
    p.add_argument("--quant-path", choices=quant_paths.PATHS, default="auto",
                   help="how GPTQ checkpoints' Linears run (quant_paths.py); auto: a kernel where the device has one")
    p.add_argument("--probe-mbytes", type=int, default=256, help="MiB of the fp32 matrix whose matrix-vector product measures bandwidth")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated with the KV cache in the decode timing")
    p.add_argument("--bos", choices=["auto", "always", "never"], default="auto", help="prepend BOS; auto: when the family's tokenizer does")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads, fixed for the run and recorded")
    devices.add_arguments(p)
    p.add_argument("--data-dir", type=Path, default=None, help="data directory; None: $CLP_DATA, then ./data")
    p.add_argument("--json", type=Path, default=None, dest="json_out", metavar="OUT", help="write the results to this JSON file")
    plan.add_args(p)
    return p


def parse_args(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    a.tasks = task_files.TASKS if a.tasks == "all" else [t for t in (a.tasks or "").split(",") if t]
    unknown = [t for t in a.tasks if t not in task_files.TASKS]
    if unknown:
        p.error(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(task_files.TASKS)}")
    if not (a.ppl or a.tasks or a.latency):
        p.error("nothing to measure: give --ppl, --tasks and/or --latency")
    if a.compare and a.teacher:
        p.error("--compare already measures KL to --ckpt; drop --teacher")
    if a.teacher and not a.ppl:
        p.error("--teacher needs --ppl: KL is measured on the perplexity windows")
    if a.ppl_windows is not None and a.ppl_windows < 1:
        p.error("--ppl-windows must be at least 1")
    if a.limit is not None and a.limit < 1:
        p.error("--limit must be at least 1")
    if a.runs < 5:
        p.error("--runs must be at least 5 (the protocol reports a median of at least 5 runs)")
    return a


@cli(memory="--batch-size, --kl-chunk or --seqlen")
def main(argv=None):
    args = parse_args(argv)
    plan.check(args, "eval", memory_plan)
    torch.set_num_threads(args.threads)
    run(**vars(args))


if __name__ == "__main__":
    main()
