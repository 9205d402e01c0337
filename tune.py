"""Cutoff endpoint tuning: repair a pruned model by training only the layers at the two ends of the cut.

    python tune.py --ckpt runs/demo/pruned --out runs/demo/tuned
    python tune.py --ckpt runs/demo/pruned --train-layers 19,20 --out runs/tune-last2   # other layers, same budget
    python tune.py --ckpt runs/demo/pruned --method lora --train-layers all --out runs/tune-lora

Our recipe (the paper publishes none; docs/design.md): the teacher is the dense model the checkpoint was cut
from (its pruning.json names it). The student is the pruned model with every weight frozen except the
chosen layers: by default the endpoint layers, i.e. the kept layers that border a removed block (for
one cut of layers s..e of the source, the pruned model's layers s-1 and s). The loss is
KL(p_teacher || p_student) over calibration tokens, as in the search; AdamW with a cosine schedule and
gradient clipping. Nothing below the first tuned layer changes, so its output is computed once and
cached, and each step runs only the layers from there up. The comparison variants use the same loop:
other layers (--train-layers 19,20 or all; pruned-model indices) and LoRA adapters (--method lora), merged into the weights at the end.
The output is a plain HF-layout checkpoint: pruning.json is carried over and tuning.json added.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

import data
import load_weights
import save_weights
from gates import spec_indices
from machinery import atomic, devices, memory, paths, placement, plan
from machinery.devices import peak_memory, stored_dtype
from machinery.errors import UserError, cli, old_spelling, read_json
from model import LINEARS, hf_state_dict
from teacher import eta, kl_backward, kl_sum, run_layers


# ---------------------------------------------------------------- which layers

def choose_layers(spec, pruning, num_layers):
    """'endpoints', 'all' or an index spec like '19,20' / '3-5' (pruned-model indices) -> sorted list."""
    if spec == "endpoints":
        if pruning is None:
            raise UserError("--train-layers endpoints needs the checkpoint's pruning.json to know where the cut is; "
                             "name the layers instead, e.g. --train-layers 11,12")
        return endpoints(pruning["kept_layers"], pruning["source_num_layers"])
    if spec == "all":
        return list(range(num_layers))
    layers = sorted(set(spec_indices(spec)))
    bad = [j for j in layers if not 0 <= j < num_layers]
    if bad:
        raise UserError(f"unknown layer(s) {bad}: the pruned model has layers 0..{num_layers - 1}")
    return layers


def endpoints(kept, L):
    """Pruned-model indices j of the kept layers next to a removed one; `kept` holds original indices of L."""
    removed = set(range(L)) - set(kept)
    return [j for j, i in enumerate(kept) if i - 1 in removed or i + 1 in removed]


# ---------------------------------------------------------------- LoRA (the comparison variant)

class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A x with W frozen; B starts at zero, so training starts from the pruned model."""

    def __init__(self, base: nn.Linear, rank, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        w = base.weight
        self.A = nn.Parameter(torch.randn(rank, w.shape[1], dtype=w.dtype, device=w.device) / math.sqrt(w.shape[1]))
        self.B = nn.Parameter(torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device))

    def forward(self, x):
        return self.base(x) + self.scale * ((x @ self.A.T) @ self.B.T)  # (B, T, r) -> (B, T, out)

    @torch.no_grad()
    def merged(self):
        self.base.weight += self.scale * (self.B @ self.A)  # (out, r) @ (r, in)
        return self.base


def swap_linears(model, layers, make):
    """Replace the 7 Linears of each layer in `layers` by make(linear)."""
    for j in layers:
        for name in LINEARS:
            parent, attr = model.layers[j].get_submodule(name.split(".")[0]), name.split(".")[1]
            setattr(parent, attr, make(getattr(parent, attr)))


# ---------------------------------------------------------------- cached inputs and targets

def teacher_states(dense, tokens):
    """The dense model's last hidden state (N, T, C): its log-probs are recomputed per chunk, not stored."""
    return frozen_prefix(dense, tokens, len(dense.layers))


@torch.no_grad()
def frozen_prefix(model, tokens, first, batch=4):
    """The hidden state (N, T, C) at the input of layer `first`: everything below it stays frozen.
    Bytes: N * T * C * bytes(weights' dtype), on the device of layer `first`."""
    cos, sin = model.rope(0, tokens.shape[1])
    out = []
    for chunk in tokens.split(batch):
        x = model.embed_tokens(chunk)
        for layer in model.layers[:first]:
            x = layer(x, cos, sin)
        out.append(x)
    return torch.cat(out)


@torch.no_grad()
def mean_kl(model, prefix, teacher, teacher_h, first, batch, chunk):
    """Mean KL of the student to the teacher over all cached windows (no gradients)."""
    total = sum(kl_sum(model, run_layers(model, prefix[j: j + batch], first), teacher_h[j: j + batch], chunk, teacher)
                for j in range(0, len(prefix), batch))
    return total / (prefix.shape[0] * prefix.shape[1])


# ---------------------------------------------------------------- the loop

def lr_at(step, steps, lr, warmup):
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def train(model, params, prefix, teacher, teacher_h, first, steps, batch_size, lr, warmup=5, clip=1.0, seed=0,
          chunk=1024, log_every=10):
    """AdamW on `params` against the cached teacher; returns (the loss of every step, {param: fp32 master}).

    Weights held in less than fp32 (bf16 on a GPU) train through fp32 master copies, and AdamW's moments are
    fp32 too: an update smaller than the weights' rounding step accumulates in the master instead of being lost.
    After each step the masters are rounded into the weights the forward uses."""
    masters = {p: p.detach().float().requires_grad_() for p in params if p.dtype != torch.float32}
    trained = [masters.get(p, p) for p in params]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(prefix), (batch_size,), generator=g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        loss = kl_backward(model, run_layers(model, prefix[idx], first), teacher_h[idx], chunk, teacher_top=teacher)
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss} at step {step + 1}: nothing was written; "
                                     f"try a smaller --lr (now {lr:g})")
        for p, m in masters.items():
            m.grad, p.grad = None if p.grad is None else p.grad.float(), None
        torch.nn.utils.clip_grad_norm_(trained, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, m in masters.items():
                p.copy_(m)
        losses.append(loss)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            print(f"step {step + 1:4d}/{steps}  KL {recent:.4f}  lr {lr_at(step, steps, lr, warmup):.2e}  "
                  f"{eta(t0, step + 1, steps, 'step')}", flush=True)
    return losses, masters


# ---------------------------------------------------------------- driver

def read_pruning(path):
    f = Path(path) / "pruning.json"
    pruning = read_json(f, "pruning.json") if f.is_file() else None
    if pruning is not None and not (isinstance(pruning, dict) and isinstance(pruning.get("kept_layers"), list)
                                    and isinstance(pruning.get("source_num_layers"), int)):
        raise UserError(f"{f} has no kept_layers / source_num_layers: not a pruning.json written by excise.py")
    return pruning


def load_teacher(teacher, pruning, student, place):
    """The dense model: --teacher, else pruning.json's source; it must share the student's vocabulary and width."""
    name = teacher or (pruning or {}).get("source")
    if name is None:
        raise UserError("no teacher: the checkpoint has no pruning.json naming its source; give --teacher")
    dense = placement.load_placed(name, **place)[0]  # run() refused a random: teacher before loading anything
    for key in ("vocab_size", "hidden_size", "model_type"):
        if getattr(dense.cfg, key) != getattr(student.cfg, key):
            raise UserError(f"teacher {name} has {key}={getattr(dense.cfg, key)!r}, "
                             f"the pruned model {getattr(student.cfg, key)!r}: not its source")
    return dense, name


def tuned_parameters(model, layers, method, rank, alpha):
    """Make the chosen weights trainable (full) or attach LoRA adapters to them; return the trainable list."""
    if method == "full":
        for j in layers:
            model.layers[j].requires_grad_(True)
        return [p for j in layers for p in model.layers[j].parameters()]
    swap_linears(model, layers, lambda lin: LoRALinear(lin, rank, alpha))
    return [p for j in layers for n, p in model.layers[j].named_parameters() if n.endswith((".A", ".B"))]


def run(ckpt, out, teacher=None, train_layers="endpoints", method="full", steps=100, lr=1e-3, batch_size=4,
         nsamples=64, val_samples=8, seqlen=256, calib="wikitext2", seed=0, rank=8, alpha=16.0, warmup=5,
         clip=1.0, kl_chunk=1024, device=None, dtype=None, devices=None, log_every=10):
    """tune.py as a function: load, cache teacher and frozen prefix, train the chosen layers, write `out`."""
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()}
    placement.refuse_random(ckpt, "checkpoint", "tuning needs a real model")
    place = dict(device=device, dtype=dtype, devices=devices)
    if min(steps, batch_size, nsamples, val_samples) < 1 or not lr > 0:
        raise UserError("--steps, --batch-size, --nsamples and --val-samples must be at least 1, --lr positive")
    t0 = time.perf_counter()
    source = load_weights.resolve(ckpt)
    if load_weights.read_config_dict(source).get("quantization_config"):
        raise UserError(f"{source} is quantized: tune the pruned checkpoint first, then quantize it")
    pruning = read_pruning(source)
    # the layers, the teacher and the output, before anything loads
    chosen = choose_layers(train_layers, pruning, placement.config(source).num_layers)
    dense = teacher or (pruning or {}).get("source")
    if dense is not None:
        placement.refuse_random(dense, "teacher", "tuning needs a real model")
    atomic.check_out(out, {"--ckpt": source, "--teacher": dense and load_weights.resolve(dense)})
    model, tokenizer, devs, _ = placement.load_placed(source, **place)
    settings["placement"] = placement.describe_split(model)
    train_t, val_t, desc = data.calibration_windows(tokenizer, calib, nsamples, seqlen, seed, model.cfg.vocab_size, val_samples)
    teacher_top, teacher_name, (teacher_h, val_teacher_h) = teacher_cache(teacher, pruning, model, (train_t, val_t), place)
    prefix, val_prefix = (frozen_prefix(model, t, chosen[0]) for t in (train_t, val_t))
    kl_before = mean_kl(model, val_prefix, teacher_top, val_teacher_h, chosen[0], batch_size, kl_chunk)
    t1 = time.perf_counter()
    print(f"tuning pruned layers {chosen} ({method}) of {model.cfg.num_layers} against {paths.shown(teacher_name)}; "
          f"{train_t.numel():,} tokens ({desc}); held-out KL before {kl_before:.4f}  [setup {t1 - t0:.0f} s]")
    torch.manual_seed(seed)
    params = tuned_parameters(model, chosen, method, rank, alpha)
    print(f"trainable parameters: {sum(p.numel() for p in params):,}")
    losses, masters = train(model, params, prefix, teacher_top, teacher_h, chosen[0], steps, batch_size, lr, warmup,
                            clip, seed, kl_chunk, log_every)
    if method == "lora":
        for p, m in masters.items():  # the adapters merge from their fp32 masters
            p.data = m.detach().to(p.device)
        swap_linears(model, chosen, LoRALinear.merged)
    model.requires_grad_(False)
    kl_after = mean_kl(model, val_prefix, teacher_top, val_teacher_h, chosen[0], batch_size, kl_chunk)
    t2 = time.perf_counter()
    print(f"held-out KL {kl_before:.4f} -> {kl_after:.4f}  ({t2 - t1:.0f} s of tuning)")
    report = {"method": method, "layers": train_layers, "tuned_layers": chosen,
              "tuned_source_layers": [pruning["kept_layers"][j] for j in chosen] if pruning else None,
              "teacher": str(teacher_name), "calibration": desc, "lr": lr, "settings": settings,
              "trainable_parameters": sum(p.numel() for p in params),
              "heldout_kl": {"before": kl_before, "after": kl_after}, "losses": losses,
              "wall_time_s": {"setup": round(t1 - t0, 2), "tuning": round(t2 - t1, 2)},
              "peak_memory_bytes": peak_memory(devs), **atomic.provenance(seed)}
    for p, m in masters.items():  # the checkpoint holds what was trained, in the source's dtype
        p.data = m.detach().to(p.device)
    write_tuned(model, source, out, report)
    print(f"tuned checkpoint: {out}")
    return report


def teacher_cache(teacher, pruning, student, token_sets, place):
    """(top, name, last hidden states per token set) of the dense teacher. `top` is what is left of the teacher
    without its layers: its own final norm and output head turn the cached states into its log-probs.
    Bytes: (N + N_val) * T * C * bytes(dtype) for the states, plus the teacher's norm and head."""
    dense, name = load_teacher(teacher, pruning, student, place)
    states = [teacher_states(dense, t) for t in token_sets]
    dense.layers = nn.ModuleList()  # the layers are done with; keep norm, head (and the tied embedding)
    return dense, name, states


def write_tuned(model, source, out, report):
    """The tuned checkpoint in the source's layout and dtype, with pruning.json carried over and tuning.json."""
    config = load_weights.read_config_dict(source)
    dtype = stored_dtype(config)
    tensors = {k: v.detach().to("cpu", dtype) for k, v in hf_state_dict(model).items()}
    extra = {"tuning.json": json.dumps(report, indent=2) + "\n"}
    if (Path(source) / "pruning.json").is_file():
        extra["pruning.json"] = (Path(source) / "pruning.json").read_text()
    save_weights.save_checkpoint(out, config, tensors, source_dir=source, extra_files=extra)


def memory_plan(a, cfg, path, placed):
    """tune.py's flags -> memory.py's plan of tuning (plan.py calls it): the teacher is --teacher or the dense source
    its pruning.json names, the trained layers --train-layers."""
    pruning = read_pruning(path)
    teacher = a.get("teacher") or (pruning or {}).get("source")
    if teacher is None:
        raise UserError("no teacher: the checkpoint has no pruning.json naming its source; give --teacher")
    tuned = choose_layers(a["train_layers"], pruning, cfg.num_layers)
    return memory.plan_tune(cfg, plan.config(teacher)[0], *placed[1:], tuned, a["nsamples"], a["val_samples"], a["seqlen"],
                            a["batch_size"], a["kl_chunk"], a["steps"], a["method"], a["rank"])


def build_parser():
    """The command line, built without running anything (tests/test_docs.py reads its flags)."""
    p = argparse.ArgumentParser(description="Repair a pruned checkpoint by tuning the layers at the ends of the cut "
                                            "against its dense source (KL distillation).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="pruned checkpoint directory (from excise.py or search.py --excise)")
    p.add_argument("--out", type=Path, required=True, help="directory to write the tuned checkpoint to")
    p.add_argument("--teacher", default=None, help="dense checkpoint to distil from; None: the source named in pruning.json")
    p.add_argument("--train-layers", default="endpoints",
                   help="layers to tune: endpoints (next to the cut), all, or the pruned model's indices like 19,20 "
                        "or 0-3 (not the source's, which excise.py --layers takes)")
    old_spelling(p, "--layers", "--train-layers")
    p.add_argument("--method", choices=["full", "lora"], default="full", help="train the layers' weights, or LoRA adapters merged at the end")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (after warm-up; cosine decay to zero)")
    p.add_argument("--batch-size", type=int, default=4, help="calibration windows per step")
    p.add_argument("--nsamples", type=int, default=64, help="training windows of calibration text")
    p.add_argument("--val-samples", type=int, default=8, help="held-out windows for the KL before and after")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window")
    p.add_argument("--calib", default="wikitext2", help="calibration text: wikitext2 (valid split), pydoc, or a text file")
    p.add_argument("--seed", type=int, default=0, help="seed of the windows, minibatch order and LoRA init")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA scale numerator: updates are alpha/rank * B A")
    p.add_argument("--warmup", type=int, default=5, help="linear warm-up steps before the cosine decay")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--kl-chunk", type=int, default=1024, help="tokens per chunk of the KL (bounds the tokens x vocab memory)")
    old_spelling(p, "--chunk", "--kl-chunk")
    devices.add_arguments(p, offload=False)
    p.add_argument("--log-every", type=int, default=10, help="print the mean loss every this many steps")
    plan.add_args(p)
    return p


@cli(memory="--batch-size, --kl-chunk or --nsamples")
def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    plan.check(a, "tune", memory_plan)
    run(**vars(a))


if __name__ == "__main__":
    main()
