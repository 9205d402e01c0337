"""Model -> Hugging Face-layout checkpoint: config.json, safetensors (sharded above a size), tokenizer files.

The writer that excise.py, tune.py, quantize.py and the embedded model's conversion share; reading is
load_weights.py. A checkpoint directory appears complete or not at all (atomic.new_dir).
"""
import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

import atomic
from errors import check_finite

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
