"""Checkpoints in Hugging Face layout: names -> directories, config.json -> Config, safetensors -> model.

    model, tok = load("smollm2-135m")            # the embedded default, converted once into a cache
    model, tok = load("/path/to/Llama-2-7b-hf")  # any HF-layout directory of a supported family

Weights load tensor by tensor from the memory-mapped safetensors into a model built on the meta
device, so a checkpoint never sits in memory twice. Every name goes through `name_table` and every
shape is checked against the config; a missing or unexpected tensor is an error naming it.
"""
import argparse
import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from machinery.devices import stored_dtype
from machinery.errors import UserError, check_device, check_finite, cli, read_json
from gptq_format import check_packable, check_quantization_config, n_groups
from model import LINEARS, Config, Transformer, column_major, name_table, rope_frequencies
from machinery.paths import shown
from quant_paths import QuantLinear, prepare
from tokenizer import load_tokenizer

DEFAULT = "smollm2-135m"
# short names -> Hugging Face repo ids (looked up locally, never downloaded by this code)
NAMES = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama2-70b": "meta-llama/Llama-2-70b-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3-70b": "meta-llama/Meta-Llama-3-70B",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama3.1-70b": "meta-llama/Llama-3.1-70B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-14b": "Qwen/Qwen2.5-14B",
    "qwen2.5-72b": "Qwen/Qwen2.5-72B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    DEFAULT: "HuggingFaceTB/SmolLM2-135M-Instruct",
}
SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}
# the architecture (config.json, no weights) of every short name: enough for a --dry-run memory plan
CONFIGS = Path(__file__).resolve().parent / "configs"


# ---------------------------------------------------------------- names -> directories

def hf_cache_dirs():
    hub = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    return Path(hub)


def looks_like_path(ckpt):
    """True for a name that can only be a local path, never a repo id ORG/NAME: it starts with /, . or ~, has
    more than one /, or its first part is a local directory (runs/x with runs/ here)."""
    s = str(ckpt)
    return (s.startswith(("/", ".", "~")) or s.count("/") > 1 or os.sep in s.replace("/", "")
            or ("/" in s and Path(s.split("/")[0]).is_dir()))


def resolve(ckpt):
    """A directory holding config.json for `ckpt` (a path, a short name or a repo id); a clear error otherwise."""
    p = Path(ckpt).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} has no config.json: not a Hugging Face checkpoint directory")
        return p
    if p.exists():
        raise UserError(f"{p} is a file, not a checkpoint directory: give the directory that holds config.json")
    if str(ckpt) == DEFAULT:
        from machinery.embedded import ensure_default
        return ensure_default()
    if looks_like_path(ckpt):
        raise FileNotFoundError(f"checkpoint directory {p} does not exist")
    repo = NAMES.get(str(ckpt), str(ckpt))
    if "/" not in repo or os.sep in repo.replace("/", "", 1):
        known = ", ".join(sorted(NAMES))
        raise FileNotFoundError(f"{ckpt!r} is neither a checkpoint directory nor a known name ({known}) nor a repo id ORG/NAME")
    looked = [f"{p} (as a local directory)"] if "/" in str(ckpt) else []
    models = os.environ.get("CLP_MODELS")
    if models:
        org, name = repo.split("/", 1)
        for cand in (Path(models) / str(ckpt), Path(models) / name, Path(models) / repo, Path(models) / f"{org}--{name}"):
            looked.append(str(cand))
            if (cand / "config.json").is_file():
                return cand
    else:
        looked.append("$CLP_MODELS (not set)")
    snaps = hf_cache_dirs() / f"models--{repo.replace('/', '--')}" / "snapshots"
    looked.append(str(snaps / "*"))
    found = sorted((s for s in snaps.glob("*") if (s / "config.json").is_file()), key=lambda s: s.stat().st_mtime)
    if found:
        return found[-1]
    where = "\n  ".join(looked)
    shipped = (f"Only its architecture ships with this project (configs/{ckpt}/config.json: enough for --dry-run); "
               f"the weights are missing.\n" if (CONFIGS / str(ckpt) / "config.json").is_file() else "")
    raise FileNotFoundError(f"checkpoint {ckpt!r} ({repo}) not found. Looked in:\n  {where}\n{shipped}"
                            f"Download it (this project never does) with:\n  huggingface-cli download {repo}\n"
                            f"or put an HF-layout copy under $CLP_MODELS/{Path(repo).name}")


def config_dir(ckpt):
    """A directory with the config.json of `ckpt`, weights or not: the checkpoint itself when it is found, else
    the shipped architecture of a short name (configs/NAME); `random:NAME` always reads configs/NAME."""
    name = str(ckpt).removeprefix("random:")
    shipped = CONFIGS / name
    if str(ckpt).startswith("random:") or str(ckpt) == DEFAULT:  # the default: never convert just to plan
        if not (shipped / "config.json").is_file():
            raise FileNotFoundError(f"no shipped config for {name!r} (known: {', '.join(sorted(NAMES))})")
        return shipped
    try:
        return resolve(ckpt)
    except FileNotFoundError:
        if (shipped / "config.json").is_file():
            return shipped
        raise


# ---------------------------------------------------------------- config.json -> Config

def read_config_dict(path):
    d = read_json(Path(path) / "config.json", "config")
    if not isinstance(d, dict):
        raise UserError(f"{Path(path) / 'config.json'} is not valid JSON for a config: not an object")
    return d


def check_config_types(d, source):
    """Clear errors for values of the wrong type, before they surface as a TypeError deep in the model."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim"):
        optional = key in ("num_key_value_heads", "head_dim") and d.get(key) is None
        if key in d and not optional and (type(d[key]) is not int or d[key] < 1):
            raise UserError(f"{source}: {key} = {d[key]!r} must be a positive integer")
    theta = d.get("rope_theta", 1.0)
    if type(theta) not in (int, float) or theta <= 0:
        raise UserError(f"{source}: rope_theta = {theta!r} must be a positive number")
    for key in ("rope_scaling", "rope_parameters", "quantization_config"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise UserError(f"{source}: {key} = {d[key]!r} must be an object")


def config_from_dict(d, source="config.json"):
    mt = d.get("model_type")
    check_config_types(d, source)
    if not isinstance(mt, str) or mt not in SUPPORTED:
        raise UserError(f"{source}: model_type {mt!r} is not supported (supported: {', '.join(sorted(SUPPORTED))})")
    if d.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (only silu)")
    if d.get("use_sliding_window"):
        raise UserError(f"{source}: use_sliding_window=true is not supported")
    # newer configs put theta and scaling together in rope_parameters
    rp = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default"):
        raise UserError(f"{source}: rope scaling {scaling!r} is not supported (only llama3)")
    if d.get("mlp_bias"):
        raise UserError(f"{source}: mlp_bias is not supported")
    try:
        return Config(
            model_type=mt,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim") or 0,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=d.get("rope_theta", rp.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and its configs do not say so
            attention_bias=mt == "qwen2" or bool(d.get("attention_bias", False)),
            qk_norm=(mt == "qwen3"),
            # only Mistral applies its window; Qwen configs carry one with use_sliding_window=false
            sliding_window=d.get("sliding_window") if mt == "mistral" else None,
        )
    except KeyError as e:
        raise UserError(f"{source}: required key {e.args[0]!r} is missing") from None
    except (TypeError, ZeroDivisionError) as e:
        raise UserError(f"{source}: a size is not a number ({e})") from None


# ---------------------------------------------------------------- safetensors -> model

def weight_files(path):
    """{tensor name: file} for a single-file or sharded (model.safetensors.index.json) checkpoint."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} has no weight_map object: not a safetensors index")
        for f in sorted(set(weight_map.values())):
            if not (path / f).is_file():
                raise FileNotFoundError(f"shard {path / f} listed in {index.name} is missing")
        return {k: path / f for k, f in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json "
                                f"(.bin / .pth checkpoints are not supported: convert them to safetensors)")
    with open_safetensors(single) as f:
        return {k: single for k in f.keys()}


def open_safetensors(f):
    """safe_open, with a truncated or corrupted file reported by name."""
    try:
        return safe_open(f, "pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{f}: not a readable safetensors file ({e}); it is truncated or corrupted: "
                        f"copy or convert it again") from None


def set_tensor(model, name, tensor):
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, attr, torch.nn.Parameter(tensor, requires_grad=False))


def checked_tensors(path, table, tied):
    """Yield (our name, tensor) for every entry of `table` (HF name -> (our name, shape)) from the safetensors
    in `path`, one tensor at a time, after checking that no tensor is missing or unexpected and every shape fits."""
    files = weight_files(path)
    # a tied model may still store lm_head.weight (some exporters do); the embedding is used then
    unexpected = [k for k in files if k not in table and not (tied and k == "lm_head.weight")
                  and not k.endswith("rotary_emb.inv_freq")]
    if unexpected:
        raise UserError(f"{path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all)")
    missing = [k for k in table if k not in files]
    if missing:
        raise UserError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} in all)")
    handles = {}
    try:
        for hf_name, (ours, shape) in table.items():
            f = files[hf_name]
            if f not in handles:
                handles[f] = open_safetensors(f)
            t = handles[f].get_tensor(hf_name)
            if tuple(t.shape) != tuple(shape):
                raise UserError(f"{f.name}: tensor {hf_name!r} has shape {tuple(t.shape)}, config.json implies {tuple(shape)}")
            check_finite(t, f"{f}: tensor {hf_name!r}")
            yield ours, t
    finally:
        handles.clear()


def load_state(model, path, dtype, device):
    """Fill a meta-device model from safetensors, strictly, one tensor at a time."""
    cfg = model.cfg
    for ours, t in checked_tensors(path, name_table(cfg), cfg.tie_word_embeddings):
        set_tensor(model, ours, t.to(device=device, dtype=dtype))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


def load(ckpt=DEFAULT, dtype=torch.float32, device="cpu", quant_path="auto"):
    """(model, tokenizer) for a checkpoint name or directory; tokenizer is None when the directory has none.
    `quant_path` picks how a GPTQ checkpoint's Linears run (quant_paths.py)."""
    check_device(device)
    path = resolve(ckpt)
    raw = read_config_dict(path)
    cfg = config_from_dict(raw, str(path / "config.json"))
    if raw.get("quantization_config"):
        model = load_quantized_model(path, raw, cfg, dtype=dtype, device=device, quant_path=quant_path)
    else:
        with torch.device("meta"):
            model = Transformer(cfg)
        load_state(model, path, dtype, device)
    # buffers are not in the checkpoint: recompute them on the real device
    model.inv_freq = rope_frequencies(cfg).to(device)
    model.eval().requires_grad_(False)
    return model, load_tokenizer(path, raw)


def decode_layout(model):
    """On CPU, store every weight that multiplies activations (the Linears and the head) column-major, in place.

    Same values and shapes, but the batch-1 product x @ W^T of decoding then reads W^T row by row: measured
    1.3-1.7x faster than the row-major layout for the embedded model's Linears and head, at equal prefill
    speed (docs/speed.md). It copies each weight once, and the memory-mapped source stays mapped until the
    model is done with it: for models that decode (generation, latency), not for training or scoring."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight = torch.nn.Parameter(column_major(m.weight.detach()), requires_grad=m.weight.requires_grad)
    if model.cfg.tie_word_embeddings:
        model.embed_tokens.weight = model.lm_head.weight
    return model


def unrounded(model, source_dir):
    """`model`, or its stored weights loaded again when the model's were rounded below them (a search in bf16 of an
    fp32 checkpoint): what a checkpoint written from it should hold."""
    dtype = stored_dtype(read_config_dict(source_dir))
    if model.embed_tokens.weight.dtype in (dtype, torch.float32):
        return model
    return load(source_dir, dtype=dtype)[0]


def fingerprint(model):
    """What identifies a model for a report: shape of the config and a digest of the embedding weights."""
    cfg = model.cfg
    # rounded to bf16 first: a search run in bf16 must name the same model as one in fp32
    w = model.embed_tokens.weight.detach().to("cpu", torch.bfloat16).float()
    digest = hashlib.sha256(w.contiguous().numpy().tobytes()).hexdigest()
    return {"model_type": cfg.model_type, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size, "embed_sha256": digest[:16]}


# ---------------------------------------------------------------- GPTQ checkpoint -> model with QuantLinears

def quantized_name_table(cfg, bits, group_size):
    """load_weights.name_table with each quantized Linear's weight replaced by the four format tensors."""
    table = {}
    for hf, (ours, shape) in name_table(cfg).items():
        mod = ours.rpartition(".")[0]
        if not (hf.endswith(".weight") and mod.split(".", 2)[-1] in LINEARS):
            table[hf] = (ours, shape)
            continue
        O, I = shape
        G, base = n_groups(I, group_size), hf[: -len(".weight")]
        table.update({f"{base}.qweight": (f"{mod}.qweight", (I * bits // 32, O)),
                      f"{base}.qzeros": (f"{mod}.qzeros", (G, O * bits // 32)),
                      f"{base}.scales": (f"{mod}.scales", (G, O)),
                      f"{base}.g_idx": (f"{mod}.g_idx", (I,))})
    return table


def swap_in_quant_linears(model, bits, group_size, zero_offset=1):
    """Replace every quantized nn.Linear of every Block by an (empty) QuantLinear of the same shape."""
    for i, layer in enumerate(model.layers):
        for name in LINEARS:
            parent_name, _, attr = name.rpartition(".")
            lin = layer.get_submodule(name)
            check_packable(f"layers.{i}.{name}", lin.in_features, lin.out_features)
            q = QuantLinear(lin.in_features, lin.out_features, bits, group_size, lin.bias is not None, zero_offset)
            setattr(layer.get_submodule(parent_name), attr, q)


def load_quantized_model(path, raw, cfg, dtype=torch.float32, device="cpu", quant_path="auto"):
    """A Transformer with QuantLinears from a GPTQ checkpoint directory, loaded strictly by name and shape.

    Called by load_weights.load when config.json has a quantization_config. Packed tensors keep their
    format dtypes (int32, fp16 scales); everything else is cast to `dtype`. The Linears are then converted
    once for `quant_path` (quant_paths.py; auto: the fastest path this device has), and the choice is printed.
    """
    bits, group_size, zero_offset = check_quantization_config(raw["quantization_config"], f"{path}/config.json")
    with torch.device("meta"):
        model = Transformer(cfg)
        swap_in_quant_linears(model, bits, group_size, zero_offset)
    table = quantized_name_table(cfg, bits, group_size)
    for ours, t in checked_tensors(path, table, cfg.tie_word_embeddings):
        set_loaded(model, ours, t, dtype, device)
    check_g_idx(model)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    used = prepare(model, quant_path, dtype)
    print(f"{path}: {bits}-bit GPTQ Linears run through " + ", ".join(f"{k} ({n})" for k, n in used.items())
          + f" [--quant-path {quant_path}]")
    return model


def set_loaded(model, name, t, dtype, device):
    """Put a loaded tensor in place: format tensors as buffers in their own dtype, the rest as Parameters."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if isinstance(mod, QuantLinear):
        keep = attr in ("qweight", "qzeros", "g_idx", "scales")
        setattr(mod, attr, t.to(device) if keep else t.to(device=device, dtype=dtype))
    else:
        setattr(mod, attr, torch.nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))


def check_g_idx(model):
    for i, layer in enumerate(model.layers):
        for name in LINEARS:
            q = layer.get_submodule(name)
            if q.g_idx.numel() and (int(q.g_idx.min()) < 0 or int(q.g_idx.max()) >= q.scales.shape[0]):
                raise UserError(f"layers.{i}.{name}: g_idx points outside the {q.scales.shape[0]} groups of scales")


# ---------------------------------------------------------------- CLI: inspect a checkpoint

def build_parser():
    """The command line, built without running anything (tests/test_docs.py reads its flags)."""
    p = argparse.ArgumentParser(description="Load a checkpoint, print its config and a greedy continuation.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT, help="checkpoint directory, short name or ORG/NAME repo id")
    p.add_argument("--prompt", default="The capital of France is", help="text to continue greedily")
    p.add_argument("--max-new-tokens", type=int, default=16, help="number of tokens to generate")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weight dtype")
    return p


@cli(memory="--dtype bfloat16")
def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    model, tok = load(a.ckpt, dtype=getattr(torch, a.dtype))
    print(f"checkpoint: {shown(resolve(a.ckpt))}")
    print(model.cfg)
    print(f"parameters: {sum(t.numel() for t in model.parameters()):,}")
    if tok is None:
        print("no tokenizer files: skipping generation")
        return
    ids = torch.tensor([tok.encode(a.prompt, bos=tok.add_bos)])
    out = decode_layout(model).generate(ids, a.max_new_tokens, eos_id=tok.eos_id)
    print(f"{a.prompt!r} -> {tok.decode(out[0, ids.shape[1]:].tolist())!r}")


if __name__ == "__main__":
    main()
