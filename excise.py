"""Cut layers out of a checkpoint: drop them, renumber the rest, write a smaller HF-layout checkpoint.

    python excise.py --ckpt smollm2-135m --layers 17-22 --out runs/smollm2-pruned
    python excise.py --ckpt smollm2-135m --search-report runs/clp-20/report.json --out runs/smollm2-pruned

The output loads in our loader and in any HF-compatible tool: config.json with the new
num_hidden_layers (and per-layer lists such as layer_types trimmed), safetensors in the source's
dtype (sharded with an index when large), tied embeddings still tied, tokenizer and generation
config copied, plus pruning.json saying what was removed, from what, by which method and why.
The write is atomic: the directory appears complete or not at all.
"""
import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import torch

import atomic
import load_weights
import placement
import save_weights
from devices import DTYPES
from errors import cli, old_spelling, parses, read_json

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def parse_layers(spec, num_layers):
    """'17-22' or '3,5,10-12' (inclusive, original indices) -> sorted list; clear errors for bad input."""
    return check_layers(spec_indices(spec), num_layers)


def spec_indices(spec):
    """'3,5,10-12' -> [3, 5, 10, 11, 12], unchecked."""
    layers = []
    for part in str(spec).replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"cannot read layer spec {part!r} in {spec!r}: use e.g. 17-22 or 3,5,10-12")
        a, b = int(m[1]), int(m[2] or m[1])
        if b < a:
            raise ValueError(f"layer range {part!r} runs backwards")
        layers += range(a, b + 1)
    return layers


def check_layers(layers, num_layers):
    layers = sorted(layers)
    if len(set(layers)) != len(layers):
        raise ValueError(f"layer {next(i for i in layers if layers.count(i) > 1)} is listed twice")
    unknown = [i for i in layers if not 0 <= i < num_layers]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}: the model has layers 0..{num_layers - 1}")
    if not 1 <= len(layers) < num_layers:
        raise ValueError(f"removing {len(layers)} of {num_layers} layers: need at least one removed and one kept")
    return layers


def fingerprint(model):
    """What identifies a model for a report: shape of the config and a digest of the embedding weights."""
    cfg = model.cfg
    # rounded to bf16 first: a search run in bf16 must name the same model as one in fp32
    w = model.embed_tokens.weight.detach().to("cpu", torch.bfloat16).float()
    digest = hashlib.sha256(w.contiguous().numpy().tobytes()).hexdigest()
    return {"model_type": cfg.model_type, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "vocab_size": cfg.vocab_size, "embed_sha256": digest[:16]}


@parses("search report")
def layers_from_report(path, model):
    """The removed layers of a search report, after checking that it was made on this very model."""
    report = read_json(path, "report")
    if not isinstance(report, dict) or "removed_layers" not in report:
        raise ValueError(f"{path} has no 'removed_layers': not a search report")
    layers = report["removed_layers"]
    if not (isinstance(layers, list) and all(type(i) is int for i in layers)):
        raise ValueError(f"{path}: removed_layers must be a list of layer indices, not {layers!r}")
    theirs, ours = report.get("model", {}).get("fingerprint", {}), fingerprint(model)
    for key, value in ours.items():
        if theirs.get(key) != value:
            raise ValueError(f"{path} was made on another model ({report.get('model', {}).get('ckpt', '?')}): "
                             f"its {key} is {theirs.get(key)!r}, this checkpoint's is {value!r}")
    return check_layers(report["removed_layers"], model.cfg.num_layers), report


def excise_tensors(tensors, removed, num_layers):
    """HF-named tensors without the removed layers; layer i becomes its rank among the kept layers."""
    new_index = {old: new for new, old in enumerate(i for i in range(num_layers) if i not in set(removed))}
    out = {}
    for name, t in tensors.items():
        m = LAYER_KEY.match(name)
        if m is None:
            out[name] = t
        elif int(m[1]) in new_index:
            out[f"model.layers.{new_index[int(m[1])]}.{m[2]}"] = t
    return out


def excise_config(config, removed):
    """config.json for the smaller model: num_hidden_layers, and every per-layer list trimmed; also the trimmed keys."""
    L = config["num_hidden_layers"]
    kept = [i for i in range(L) if i not in set(removed)]
    new = dict(config, num_hidden_layers=len(kept))
    # per-layer lists (layer_types, ...) have one entry per layer; architectures and eos ids are not per-layer
    trimmed = [key for key, v in config.items()
               if isinstance(v, list) and len(v) == L and key not in ("architectures", "eos_token_id")]
    for key in trimmed:
        new[key] = [config[key][i] for i in kept]
    return new, trimmed


def source_dtype(config):
    """The dtype the checkpoint is stored in (config torch_dtype, or dtype in newer configs); fp32 if unsaid."""
    return DTYPES.get(config.get("torch_dtype") or config.get("dtype"), torch.float32)


def write_pruned(model, source_dir, removed, out, info=None):
    """Write the pruned checkpoint of `model` (loaded from source_dir) to `out`, with pruning.json."""
    L = model.cfg.num_layers
    removed = check_layers(removed, L)
    config, trimmed = excise_config(load_weights.read_config_dict(source_dir), removed)
    dtype = source_dtype(config)
    if model.embed_tokens.weight.dtype not in (dtype, torch.float32):
        # weights rounded for the search (e.g. bf16 from an fp32 source): cut the stored ones instead
        model, _ = load_weights.load(source_dir, dtype=dtype)
    # the model may have been loaded in another dtype for the search: write the source's dtype back
    tensors = {k: v.to(dtype) for k, v in excise_tensors(load_weights.hf_state_dict(model), removed, L).items()}
    pruning = {"source": str(source_dir), "source_num_layers": L,
               "removed_layers": removed, "kept_layers": [i for i in range(L) if i not in removed],
               "num_layers": L - len(removed), "config_lists_trimmed": trimmed,
               "method": "manual", "budget": {"layers": len(removed), "ratio": round(len(removed) / L, 4)},
               "calibration": None, "scores": None, **(info or {}),
               "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv)}
    save_weights.save_checkpoint(out, config, tensors, source_dir=source_dir,
                                 extra_files={"pruning.json": json.dumps(pruning, indent=2) + "\n"})
    return pruning


def info_from_report(report, path=None):
    """What pruning.json repeats from a search report: method, calibration and the scores behind the choice."""
    return {"method": report.get("method", "clp-gate"), "calibration": report.get("calibration"),
            "scores": {"kl": report.get("kl"), "candidates": report.get("candidates", report.get("scores"))},
            "report": str(path) if path else None}


def excise(ckpt, out, layers=None, search_report=None):
    """Load `ckpt`, remove `layers` (a spec like '17-22', original indices) or the removed_layers of the
    search.py / baselines.py report.json at `search_report`, write `out`."""
    placement.refuse_random(ckpt, "--ckpt", "there is nothing to excise")
    source = load_weights.resolve(ckpt)
    atomic.check_out(out, {"--ckpt": source})
    config = load_weights.read_config_dict(source)
    if search_report is None:  # the layer spec needs no weights: check it first
        removed, info = parse_layers(layers, load_weights.config_from_dict(config, str(source / "config.json")).num_layers), {}
    # load in the stored dtype: no up-cast copy of a large bf16 checkpoint
    model, _ = load_weights.load(source, dtype=source_dtype(config))
    if search_report is not None:
        removed, rep = layers_from_report(search_report, model)
        info = info_from_report(rep, search_report)
    pruning = write_pruned(model, source, removed, out, info)
    print(f"removed layers {removed} of {model.cfg.num_layers}; wrote {pruning['num_layers']}-layer checkpoint to {out}")
    return pruning


def build_parser():
    """The command line, built without running anything (tests/test_docs.py reads its flags)."""
    p = argparse.ArgumentParser(description="Remove layers from a checkpoint and write the smaller HF-layout checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=load_weights.DEFAULT, help="checkpoint directory or short name to prune")
    p.add_argument("--layers", default=None, help="layers to remove, original inclusive indices, e.g. 17-22 or 3,5,10-12")
    p.add_argument("--search-report", type=Path, default=None,
                   help="a search.py or baselines.py report.json whose removed_layers to cut")
    old_spelling(p, "--report", "--search-report")
    p.add_argument("--out", type=Path, required=True, help="directory to write the pruned checkpoint to")
    return p


@cli()
def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if (a.layers is None) == (a.search_report is None):
        p.error("give exactly one of --layers and --search-report")
    excise(a.ckpt, a.out, layers=a.layers, search_report=a.search_report)


if __name__ == "__main__":
    main()
