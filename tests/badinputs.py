"""Tiny checkpoints, each broken in one way a user could meet, for the robustness tests (test_robustness.py).

Every builder takes a scratch directory and returns the checkpoint path to pass to a CLI. The table in
docs/robustness.md describes each one by the first line of its docstring.
"""
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import load_weights as lw
import save_weights
from conftest import FIXTURES
from model import Transformer, hf_state_dict
from tokenizer import byte_decoder

SRC = FIXTURES / "tiny-llama2"
# a Qwen2-style config whose Linear sizes are multiples of 32, so that GPTQ can pack it
PACKABLE = {"model_type": "qwen2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "tie_word_embeddings": True, "max_position_embeddings": 256}


def byte_tokenizer():
    """A byte-level BPE tokenizer.json with no merges: token id = byte value (fits a 512-token vocabulary)."""
    vocab = {c: b for c, b in byte_decoder().items()}
    return {"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": [],
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}}


def tiny(tmp, name="ckpt"):
    """a valid tiny LLaMA checkpoint (6 layers) with a byte-level tokenizer"""
    out = tmp / name
    shutil.copytree(SRC, out, ignore=shutil.ignore_patterns("reference.safetensors"))
    for f in out.iterdir():
        f.chmod(0o644)
    (out / "tokenizer.json").write_text(json.dumps(byte_tokenizer()))
    return out


def edit_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return ckpt


def edit_tensors(ckpt, fn):
    tensors = load_file(ckpt / "model.safetensors")
    fn(tensors)
    save_file(tensors, ckpt / "model.safetensors")
    return ckpt


def missing(tmp):
    """a checkpoint directory that does not exist"""
    return tmp / "nope"


def missing_relative(tmp):
    """a relative path to a directory that does not exist (never taken for a repo id ORG/NAME)"""
    return Path(os.path.relpath(tmp / "runs" / "x"))


def a_file(tmp):
    """a file (model.safetensors) given as the checkpoint"""
    return tiny(tmp) / "model.safetensors"


def no_config(tmp):
    """a directory without config.json"""
    ckpt = tiny(tmp)
    (ckpt / "config.json").unlink()
    return ckpt


def config_bad_json(tmp):
    """config.json that is not JSON"""
    ckpt = tiny(tmp)
    (ckpt / "config.json").write_text('{"model_type": "llama",')
    return ckpt


def config_arch(tmp):
    """config.json of an unknown architecture (gpt2)"""
    return edit_config(tiny(tmp), model_type="gpt2")


def config_type(tmp):
    """config.json with a size that is a string"""
    return edit_config(tiny(tmp), hidden_size="64")


def config_wrong_type(tmp):
    """config.json whose rope_scaling is a string, not an object"""
    return edit_config(tiny(tmp), rope_scaling="llama3")


def config_missing_key(tmp):
    """config.json without vocab_size"""
    return edit_config(tiny(tmp), vocab_size=None)


def cut_short(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return ckpt


def st_truncated(tmp):
    """model.safetensors cut short (an interrupted copy)"""
    return cut_short(tiny(tmp))


def st_header(tmp):
    """model.safetensors with a corrupted header"""
    ckpt = tiny(tmp)
    f = ckpt / "model.safetensors"
    f.write_bytes(b"\xff" * 8 + f.read_bytes()[8:])
    return ckpt


def st_empty(tmp):
    """model.safetensors of 0 bytes"""
    ckpt = tiny(tmp)
    (ckpt / "model.safetensors").write_bytes(b"")
    return ckpt


def st_shape(tmp):
    """weights whose shapes disagree with config.json"""
    return edit_config(tiny(tmp), intermediate_size=160)


def st_missing_tensor(tmp):
    """model.safetensors without one layer's tensor"""
    return edit_tensors(tiny(tmp), lambda t: t.pop("model.layers.5.mlp.up_proj.weight"))


def st_nan(tmp):
    """a NaN in one stored weight"""
    return edit_tensors(tiny(tmp), lambda t: t["model.layers.2.self_attn.v_proj.weight"].view(-1)[7].fill_(float("nan")))


def sharded(tmp):
    model, _ = lw.load(SRC)
    out = save_weights.save_checkpoint(tmp / "ckpt", lw.read_config_dict(SRC), hf_state_dict(model), max_shard_bytes=300_000)
    (out / "tokenizer.json").write_text(json.dumps(byte_tokenizer()))
    return out


def index_bad_json(tmp):
    """model.safetensors.index.json that is not JSON"""
    ckpt = sharded(tmp)
    (ckpt / "model.safetensors.index.json").write_text("{")
    return ckpt


def shard_missing(tmp):
    """a shard listed in the index is missing"""
    ckpt = sharded(tmp)
    sorted(ckpt.glob("model-*.safetensors"))[-1].unlink()
    return ckpt


def no_weights(tmp):
    """only a pickled pytorch_model.bin, no safetensors (never unpickled)"""
    ckpt = tiny(tmp)
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    return ckpt


def tokenizer_bad_json(tmp):
    """tokenizer.json that is not JSON"""
    ckpt = tiny(tmp)
    (ckpt / "tokenizer.json").write_text("[1, 2")
    return ckpt


def tokenizer_wrong_structure(tmp):
    """tokenizer.json that is JSON but has added_tokens of the wrong type"""
    ckpt = tiny(tmp)
    (ckpt / "tokenizer.json").write_text(json.dumps(dict(byte_tokenizer(), added_tokens="none")))
    return ckpt


def tokenizer_model_bad(tmp):
    """a tokenizer.model that is neither sentencepiece nor tiktoken"""
    ckpt = tiny(tmp)
    (ckpt / "tokenizer.model").write_bytes(b"\x00\x01 not a model")
    return ckpt


def tokenizer_config_bad_json(tmp):
    """tokenizer_config.json that is not JSON"""
    ckpt = tiny(tmp)
    (ckpt / "tokenizer_config.json").write_text("add_bos_token: true")
    return ckpt


def no_tokenizer(tmp):
    """a checkpoint without tokenizer files"""
    ckpt = tiny(tmp)
    (ckpt / "tokenizer.json").unlink()
    return ckpt


def huge(tmp, name="ckpt"):
    """finite weights that overflow in the forward pass (norm weights of 1e30 and 3e38)"""
    ckpt = tiny(tmp, name)

    def scale(t):
        t["model.layers.0.input_layernorm.weight"].fill_(1e30)
        t["model.norm.weight"].fill_(3e38)
    return edit_tensors(ckpt, scale)


def pruned(tmp):
    """a pruned checkpoint (layers 2-3 cut) with its pruning.json"""
    src = tiny(tmp, "dense")
    model, _ = lw.load(src)
    save_weights.write_pruned(model, src, [2, 3], tmp / "ckpt")
    return tmp / "ckpt"


def pruned_bad_json(tmp):
    """pruning.json that is not JSON"""
    ckpt = pruned(tmp)
    (ckpt / "pruning.json").write_text("{'removed': [2, 3]}")
    return ckpt


def pruned_no_layers(tmp):
    """pruning.json without kept_layers"""
    ckpt = pruned(tmp)
    (ckpt / "pruning.json").write_text('{"source": "dense"}')
    return ckpt


def pruned_source_gone(tmp):
    """pruning.json names a dense source that no longer exists"""
    ckpt = pruned(tmp)
    shutil.rmtree(tmp / "dense")
    return ckpt


def pruned_huge(tmp):
    """a pruned checkpoint of weights that overflow in the forward pass"""
    src = huge(tmp, "dense")
    model, _ = lw.load(src)
    save_weights.write_pruned(model, src, [2, 3], tmp / "ckpt")
    return tmp / "ckpt"


def packable(tmp, name="ckpt", fill=None):
    """a valid tiny Qwen2 checkpoint whose Linears GPTQ can pack"""
    torch.manual_seed(0)
    model = Transformer(lw.config_from_dict(PACKABLE))
    tensors = {k: v.detach().clone() for k, v in hf_state_dict(model).items()}
    if fill:
        fill(tensors)
    out = save_weights.save_checkpoint(tmp / name, PACKABLE, tensors)
    (out / "tokenizer.json").write_text(json.dumps(byte_tokenizer()))
    return out


def packable_truncated(tmp):
    """a packable checkpoint whose model.safetensors is cut short"""
    return cut_short(packable(tmp))


def packable_huge(tmp):
    """a packable checkpoint whose layer-0 inputs overflow (input norm weight 1e30)"""
    return packable(tmp, fill=lambda t: t["model.layers.0.input_layernorm.weight"].fill_(1e30))


def report_bad_json(tmp):
    """report.json that is not JSON (e.g. cut short)"""
    (tmp / "report.json").write_text('{"removed_layers": [2, 3')
    return tiny(tmp)


def report_no_layers(tmp):
    """a report.json without removed_layers"""
    (tmp / "report.json").write_text('{"method": "clp-gate"}')
    return tiny(tmp)


def report_bad_layers(tmp):
    """a report.json whose removed_layers is not a list of indices"""
    (tmp / "report.json").write_text('{"removed_layers": "2-3"}')
    return tiny(tmp)


def quant_config_bad(tmp):
    """config.json with an unsupported quantization_config (AWQ)"""
    return edit_config(tiny(tmp), quantization_config={"quant_method": "awq", "bits": 4})


def report_other_model(tmp):
    """a report.json made on another model"""
    (tmp / "report.json").write_text(json.dumps({"removed_layers": [2, 3], "model": {
        "ckpt": "other", "fingerprint": {"model_type": "llama", "num_layers": 6, "hidden_size": 64,
                                         "vocab_size": 512, "embed_sha256": "0" * 16}}}))
    return tiny(tmp)


def task_bad_json(tmp):
    """a task file with a malformed JSON line"""
    (tmp / "data" / "piqa").mkdir(parents=True)
    (tmp / "data" / "piqa" / "valid.jsonl").write_text('{"goal": "x", "sol1": "a", "sol2": "b"}\n{"goal": \n')
    return tiny(tmp)


def task_missing(tmp):
    """no file for the task under the data directory"""
    (tmp / "data").mkdir()
    return tiny(tmp)


def task_not_utf8(tmp):
    """a task file that is not UTF-8 text"""
    (tmp / "data" / "piqa").mkdir(parents=True)
    (tmp / "data" / "piqa" / "valid.jsonl").write_bytes(b'{"goal": "\xff\xfe"}\n')
    return tiny(tmp)
