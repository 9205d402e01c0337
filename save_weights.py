"""Model -> Hugging Face-layout checkpoint: config.json, safetensors (sharded above a size), tokenizer files.

The writer that excise.py, search.py --excise, tune.py, quantize.py and the embedded model's conversion share,
and the cut itself: a checkpoint without some layers, renumbered, with pruning.json (write_pruned). Reading
is load_weights.py. A checkpoint directory appears complete or not at all (atomic.new_dir).
"""
import json
import re
import shutil
from pathlib import Path

from safetensors.torch import save_file

from gates import check_layers
from machinery import atomic
from machinery.devices import stored_dtype
from machinery.errors import check_finite, read_json
from model import hf_state_dict

TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt", "LICENSE", "README.md"]


def save_checkpoint(out_dir, config, tensors, source_dir=None, extra_files=None, max_shard_bytes=5 * 2**30):
    """Write config.json + safetensors (sharded with an index above max_shard_bytes) atomically.

    Tokenizer and generation-config files are copied from `source_dir`; `extra_files` maps a file name
    to its text. The directory appears complete or not at all: it is built beside `out_dir` and renamed.
    """
    out_dir = Path(out_dir)
    atomic.check_out(out_dir, {"source": source_dir})  # a last guard: the tools check this before loading
    for name, t in tensors.items():
        check_finite(t.detach(), f"tensor {name!r} to be written to {out_dir}")
    with atomic.new_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_safetensors(tmp, {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, max_shard_bytes)
        for name in TOKENIZER_FILES if source_dir else []:
            if (Path(source_dir) / name).is_file():
                shutil.copyfile(Path(source_dir) / name, tmp / name)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return out_dir


def write_safetensors(directory, tensors, max_shard_bytes):
    shards, current, size = [], {}, 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for j, shard in enumerate(shards):
        fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        total += sum(v.numel() * v.element_size() for v in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------- the pruned checkpoint (excise.py, search.py --excise)

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


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


def write_pruned(model, source_dir, removed, out, info=None):
    """Write `model` (loaded from source_dir, every layer) without the `removed` layers, renumbered, to `out` in the
    source's stored dtype, with config.json trimmed and pruning.json saying what was cut from what (`info`:
    method, calibration, scores; see info_from_report). A model whose weights were rounded below the stored
    ones (a bf16 search of an fp32 checkpoint) is first passed through load_weights.unrounded."""
    L = model.cfg.num_layers
    removed = check_layers(removed, L)
    config = read_json(Path(source_dir) / "config.json", "config.json")
    new_config, trimmed = excise_config(config, removed)
    dtype = stored_dtype(config)
    tensors = {k: v.to(dtype) for k, v in excise_tensors(hf_state_dict(model), removed, L).items()}
    pruning = {"source": str(source_dir), "source_num_layers": L,
               "removed_layers": removed, "kept_layers": [i for i in range(L) if i not in removed],
               "num_layers": L - len(removed), "config_lists_trimmed": trimmed,
               "method": "manual", "budget": {"layers": len(removed), "ratio": round(len(removed) / L, 4)},
               "calibration": None, "scores": None, **(info or {}),
               **atomic.provenance()}
    save_checkpoint(out, new_config, tensors, source_dir=source_dir,
                    extra_files={"pruning.json": json.dumps(pruning, indent=2) + "\n"})
    return pruning


def info_from_report(report, path=None):
    """What pruning.json repeats from a search report: method, calibration and the scores behind the choice."""
    return {"method": report.get("method", "clp-gate"), "calibration": report.get("calibration"),
            "scores": {"kl": report.get("kl"), "candidates": report.get("candidates", report.get("scores"))},
            "report": str(path) if path else None}
