"""Putting a model on its devices: one device, contiguous slices of layers over several, or streamed.

The math in model.py does not change. Each Block gets a `device` (where it computes) and a forward that
first moves its inputs there; the decoder loops move the hidden state to the next layer's device
(model.follow), so activations cross devices only at slice boundaries.

- one device: everything on it (the loader already put the weights there).
- several devices (--devices cuda:0,cuda:1): layers in contiguous slices balanced by memory, the embedding
  on the first device, the final norm and the head on the last.
- offload (--offload): the layers' weights stay where they are in CPU memory (the memory-mapped
  safetensors, no second copy); each call of a layer builds a fresh copy of it on the device, runs it and
  lets it go. Under autograd the call is checkpointed, so backward fetches the layer again and recomputes
  its forward instead of keeping its weights and activations alive.
"""
import zlib
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

import load_weights
from machinery.devices import from_flags
from machinery.errors import UserError
from model import Block, Transformer, rope_frequencies


# ---------------------------------------------------------------- which layers go where

def split_layers(num_layers, layer_bytes, first_bytes, last_bytes, capacities):
    """Device index of each layer: contiguous slices, each device's share of all bytes in proportion to its
    capacity, the first device also holding `first_bytes` (embedding), the last `last_bytes` (norm, head)."""
    total = first_bytes + num_layers * layer_bytes + last_bytes
    bounds, acc = [], 0.0
    for c in capacities:
        acc += c / sum(capacities)
        bounds.append(acc * total)
    # a layer goes to the device whose share holds the middle of its bytes
    return [next(d for d, b in enumerate(bounds) if first_bytes + (i + 0.5) * layer_bytes <= b or d == len(bounds) - 1)
            for i in range(num_layers)]


def capacity(dev):
    """Free bytes on a GPU; CPU 'devices' count as equal."""
    return torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else 1


def nbytes(module, dtype):
    return sum(p.numel() for p in module.parameters()) * torch.finfo(dtype).bits // 8


# ---------------------------------------------------------------- moving layers and inputs

def pin(layer, device):
    """Layer computes on `device`: its inputs are moved there on every call."""
    block_forward = layer.forward

    def forward(x, cos, sin, cache=None, layer_idx=0):
        return block_forward(x.to(device), cos.to(device), sin.to(device), cache, layer_idx)

    layer.forward, layer.device = forward, device


def stream(layer, i, device, dtype, fetch):
    """Layer i computes on `device` from weights fetched anew at each call (checkpointed under autograd)."""
    layer.fetch, layer.index, layer.dtype = fetch, i, dtype

    def forward(x, cos, sin, cache=None, layer_idx=0):
        def run(x, cos, sin):
            return materialize(layer, device)(x, cos, sin, cache, layer_idx)
        x, cos, sin = x.to(device), cos.to(device), sin.to(device)
        if torch.is_grad_enabled():
            # backward fetches the layer again and reruns its forward: no weights kept alive
            return checkpoint(run, x, cos, sin, use_reentrant=False)
        return run(x, cos, sin)

    layer.forward, layer.device = forward, device


def materialize(layer, device):
    """A fresh Block on `device` holding layer's weights (fetched, in layer.dtype); the caller may change it."""
    with torch.device("meta"):
        fresh = Block(layer.self_attn.cfg)
    for name, p in layer.named_parameters():
        t = layer.fetch(f"layers.{layer.index}.{name}", p, device, layer.dtype)
        if p.requires_grad:  # a gradient is wanted for the stored weight (Taylor importance): the copy stays in the graph
            owner, _, attr = name.rpartition(".")
            module = fresh.get_submodule(owner)
            del module._parameters[attr]
            setattr(module, attr, t)
        else:
            load_weights.set_tensor(fresh, name, t)
    fresh.device = device
    return fresh


def on_device(model, i):
    """Layer i as a module on its compute device: the layer itself, or a fresh copy when it is streamed."""
    layer = model.layers[i]
    return materialize(layer, layer.device) if hasattr(layer, "fetch") else layer


def copy_weight(name, p, device, dtype):
    return p.to(device, dtype)


def move(module, device, dtype):
    """Module to `device`, its parameters to `dtype`; buffers keep theirs (a quantized Linear's fp16 scales)."""
    for p in module.parameters():
        # cast on the way: a layer stored in fp32 never lands on the GPU in fp32
        p.data = p.data.to(device, dtype if p.is_floating_point() else p.dtype)
    module.to(device)


def move_inputs(module, args):
    return (args[0].to(module.weight.device),) + args[1:]


def layer_devices(model, devs, dtype, offload=False):
    """The device of each layer: all on the one device when streaming, else split_layers over `devs`."""
    L = model.cfg.num_layers
    if offload or len(devs) == 1:
        return [devs[0]] * L
    head = nbytes(model.norm, dtype) + nbytes(model.lm_head, dtype)
    split = split_layers(L, nbytes(model.layers[0], dtype), nbytes(model.embed_tokens, dtype), head,
                         [capacity(d) for d in devs])
    return [devs[d] for d in split]


def place(model, devs, dtype, offload=False, fetch=copy_weight, where=None):
    """Put `model` (any device, weights in any dtype) on `devs` in `dtype`; see the module docstring."""
    where = where or layer_devices(model, devs, dtype, offload)
    first, last = devs[0], where[-1]
    move(model.embed_tokens, first, dtype)
    move(model.norm, last, dtype)
    if model.cfg.tie_word_embeddings and first != last:
        # the head sits on the last device: it needs its own copy of the tied embedding there
        model.lm_head.weight = torch.nn.Parameter(model.embed_tokens.weight.detach().to(last), requires_grad=False)
    else:
        move(model.lm_head, last, dtype)
    model.embed_tokens.register_forward_pre_hook(move_inputs)
    model.inv_freq = rope_frequencies(model.cfg).to(first)
    for i, (layer, dev) in enumerate(zip(model.layers, where)):
        if offload:
            stream(layer, i, dev, dtype, fetch)
        else:
            move(layer, dev, dtype)
            pin(layer, dev)
    model.devices = where
    return model


def describe_split(model):
    """'layers 0-15 on cuda:0, 16-31 on cuda:1' (or the streaming note)."""
    runs = []
    for i, d in enumerate(model.devices):
        if runs and runs[-1][2] == d:
            runs[-1][1] = i
        else:
            runs.append([i, i, d])
    streamed = " (streamed)" if hasattr(model.layers[0], "fetch") else ""
    return ", ".join(f"layers {a}-{b} on {d}{streamed}" for a, b, d in runs)


# ---------------------------------------------------------------- models of real shapes with random weights

RANDOM = "random:"


RANDOM_NOTE = ("seeded random weights of the config's shapes: the speed and memory figures hold; no KL, block, "
               "score or perplexity from them measures a real model")


def is_random(ckpt):
    return str(ckpt).startswith(RANDOM)


def refuse_random(ckpt, what, why):
    """Refuse random weights where the output would mean nothing: `what` names the input, `why` the reason."""
    if is_random(ckpt):
        raise UserError(f"{what} {ckpt} has random weights: {why} (random: is for memory and speed runs)")


def mark_random(report, *ckpts):
    """Mark a report made from random weights (any of `ckpts` random:): the speed and memory figures hold, no
    quality figure means anything. Returns the report."""
    if any(is_random(c) for c in ckpts if c):
        report["random_weights"] = RANDOM_NOTE
    return report


def random_config(ckpt):
    """config.json of `random:NAME` (configs/NAME/config.json in the repository) or `random:DIR`."""
    name = str(ckpt)[len(RANDOM):]
    here = Path(__file__).resolve().parent.parent / "configs" / name
    path = Path(name).expanduser() if Path(name).expanduser().is_dir() else here
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt}: no config.json at {path} (random:NAME reads configs/NAME/config.json, "
                                f"random:DIR reads DIR/config.json)")
    raw = load_weights.read_config_dict(path)
    return load_weights.config_from_dict(raw, str(path / "config.json")), path


def config(ckpt):
    """The Config of a checkpoint or random:NAME from its config.json alone: what can be checked before loading."""
    if is_random(ckpt):
        return random_config(ckpt)[0]
    path = load_weights.resolve(ckpt)
    return load_weights.config_from_dict(load_weights.read_config_dict(path), str(path / "config.json"))


def random_weight(seed):
    """fetch() for seeded random weights made on the device itself: norms 1, biases 0, the rest N(0, 0.02^2),
    each tensor from its own generator seeded by its name, so a streamed layer is the same every time."""
    def fetch(name, p, device, dtype):
        if name.endswith("norm.weight"):
            return torch.ones(p.shape, device=device, dtype=dtype)
        if name.endswith(".bias"):
            return torch.zeros(p.shape, device=device, dtype=dtype)
        g = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return 0.02 * torch.randn(p.shape, generator=g, device=device, dtype=dtype)
    return fetch


def random_model(ckpt, devs, dtype, offload=False, seed=0):
    """A model of the config named by `ckpt` (random:NAME) with seeded random weights made on its devices."""
    cfg, path = random_config(ckpt)
    with torch.device("meta"):
        model = Transformer(cfg)
    fetch = random_weight(seed)
    where = layer_devices(model, devs, dtype, offload)
    for name, p in list(model.named_parameters()):
        if name.startswith("layers.") and offload:
            continue  # streamed: made at each call
        dev = where[int(name.split(".")[1])] if name.startswith("layers.") else (
            devs[0] if name.startswith("embed_tokens") else where[-1])
        load_weights.set_tensor(model, name, fetch(name, p, dev, dtype))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.random_source = str(path)
    return place(model, devs, dtype, offload, fetch, where), None


# ---------------------------------------------------------------- loading for the CLIs

def load_placed(ckpt, device=None, dtype=None, devices=None, offload=False, seed=0, quant_path="auto"):
    """(model, tokenizer, devices, dtype) for a checkpoint or random:NAME, placed as the flags say; `quant_path`:
    how a GPTQ checkpoint's Linears run (quant_paths.py), chosen for the devices they end up on."""
    devs, dt = from_flags(device, dtype, devices, offload)
    if is_random(ckpt):
        model, tok = random_model(ckpt, devs, dt, offload, seed)
        print(f"note: {ckpt} has seeded random weights (seed {seed}): for memory and speed only, "
              f"no quality figure means anything")
    else:
        quantized = bool(load_weights.read_config_dict(load_weights.resolve(ckpt)).get("quantization_config"))
        if offload and quantized:
            raise UserError(f"{ckpt} is quantized: --offload streams plain layers only; use --device or --devices")
        # several devices or streaming: the weights first stay as stored (memory-mapped, no copy)
        simple = len(devs) == 1 and not offload
        model, tok = load_weights.load(ckpt, dtype=dt if simple or quantized else None,
                                       device=devs[0] if simple else "cpu", quant_path=quant_path)
        place(model, devs, dt, offload)
        if quantized and not simple:
            import quant_paths
            quant_paths.prepare(model, quant_path, dt)  # again, now that each Linear is on its device
    print(f"placement: {describe_split(model)}, {str(dt).removeprefix('torch.')}")
    return model, tok, devs, dt
