"""Tokenizers of the supported families behind one interface: encode(text, bos=False) / decode(ids).

- sentencepiece `tokenizer.model` (LLaMA-2, Mistral)
- tiktoken-format `tokenizer.model`, lines of "base64-bytes rank" (LLaMA-3 original release)
- byte-level BPE `tokenizer.json` (LLaMA-3 HF, Qwen2/2.5/3, SmolLM2), run through tiktoken's BPE core:
  ranks come from the file's merge list, the split pattern from its pre-tokenizer, special tokens stay whole.
"""
import base64
import re
import unicodedata
from pathlib import Path

from machinery.errors import UserError, parses, read_json

# GPT-2's byte-level split, used by a ByteLevel pre-tokenizer with use_regex=true
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The same split run after Digits(individual_digits=true), as one regex: every digit stands alone,
# and a digit ends a whitespace run the way the end of a piece does ("   1" -> "   ", "1").
DIGITS_THEN_GPT2_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
# LLaMA-3's split (also what its tokenizer.json carries)
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


class Tokenizer:
    bos_id = None
    eos_id = None
    add_bos = False  # whether the family's own tokenizer prepends BOS by default

    def encode(self, text, bos=False):
        ids = self._encode(text)
        return [self.bos_id] + ids if bos and self.bos_id is not None else ids


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.add_bos = True
        self.vocab_size = self.sp.get_piece_size()

    def _encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode(list(ids))


class BPETokenizer(Tokenizer):
    """Byte-level BPE on tiktoken's core. `ranks` (bytes -> rank) set merge priority; `rank_to_id` maps to ids."""

    def __init__(self, ranks, rank_to_id, pattern, special, normalize=None):
        import tiktoken

        base = max(ranks.values()) + 1
        special_ranks = {s: base + j for j, s in enumerate(special)}
        self.enc = tiktoken.Encoding("clp", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_ranks)
        self.rank_to_id = dict(rank_to_id)
        self.rank_to_id.update({special_ranks[s]: i for s, i in special.items()})
        self.complete = None not in self.rank_to_id.values()
        self.id_to_bytes = {self.rank_to_id[r]: b for b, r in ranks.items() if self.rank_to_id[r] is not None}
        self.id_to_bytes.update({i: s.encode() for s, i in special.items()})
        self.normalize = normalize
        self.vocab_size = max(self.id_to_bytes) + 1

    def _encode(self, text):
        if self.normalize:
            text = unicodedata.normalize(self.normalize, text)
        r2i = self.rank_to_id
        ids = [r2i[r] for r in self.enc.encode(text, allowed_special="all")]
        return ids if self.complete else [i for i in ids if i is not None]

    def decode(self, ids):
        return b"".join(self.id_to_bytes[i] for i in ids).decode("utf-8", errors="replace")


def byte_decoder():
    """GPT-2's printable stand-ins for bytes (tokenizer.json stores tokens in them) -> byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def split_pattern(pre, source):
    """The one regex equivalent to a tokenizer.json pre_tokenizer, or a clear error."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return DIGITS_THEN_GPT2_PATTERN
    if kinds in (["Split", "ByteLevel"], ["Split"]) and "Regex" in steps[0].get("pattern", {}) \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert") \
            and not (len(steps) == 2 and steps[1].get("use_regex", True)):
        return steps[0]["pattern"]["Regex"]
    raise UserError(f"{source}: pre_tokenizer {kinds} is not supported (byte-level BPE with a ByteLevel, "
                     f"Digits+ByteLevel or Split+ByteLevel pre-tokenizer is)")


@parses("tokenizer.json")
def bpe_from_tokenizer_json(path):
    path = Path(path)
    tj = read_json(path, "tokenizer.json")
    model = tj.get("model", {}) if isinstance(tj, dict) else None
    if not isinstance(model, dict):
        raise UserError(f"{path}: no tokenizer model object: not a tokenizer.json")
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UserError(f"{path}: only byte-level BPE tokenizer.json is supported (found {model.get('type')}"
                         f"{' with byte_fallback' if model.get('byte_fallback') else ''}; a sentencepiece "
                         f"tokenizer.model is read instead when present)")
    norm = tj.get("normalizer")
    if norm and norm.get("type") != "NFC":
        raise UserError(f"{path}: normalizer {norm.get('type')!r} is not supported")
    pattern = split_pattern(tj.get("pre_tokenizer"), path)
    dec = byte_decoder()
    to_bytes = lambda tok: bytes(dec[c] for c in tok)
    vocab = model["vocab"]
    # single bytes get ranks 0..255; each merge result gets 256 + its (first) position in the merge list
    ranks = {bytes([b]): b for b in range(256)}
    # a byte missing from the vocabulary (SmolLM2 lacks some control bytes) encodes to nothing, as in HF's BPE
    rank_to_id = {b: vocab.get(c) for c, b in dec.items()}
    for j, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        merged = to_bytes(a + b)
        if merged not in ranks:
            ranks[merged] = 256 + j
            rank_to_id[256 + j] = vocab[a + b]
    special = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    return BPETokenizer(ranks, rank_to_id, pattern, special, "NFC" if norm else None), tj


def tiktoken_model_file(path):
    """LLaMA-3's original tokenizer.model: 'base64 rank' lines, plus 256 special tokens after the ranks."""
    ranks = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    base = len(ranks)
    names = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(254)]
    # LLaMA-3.0 naming: 128006/128007 frame chat headers, 128009 ends a turn
    names[6], names[7], names[9] = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
    special = {s: base + j for j, s in enumerate(names)}
    tok = BPETokenizer(ranks, {r: r for r in ranks.values()}, LLAMA3_PATTERN, special)
    tok.bos_id, tok.eos_id, tok.add_bos = special["<|begin_of_text|>"], special["<|end_of_text|>"], True
    return tok


def is_tiktoken_file(path):
    with open(path, "rb") as f:
        head = f.read(200).split(b"\n")[0]
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", head) is not None


def post_processor_adds_bos(pp):
    """True when tokenizer.json's post-processor template starts with a special token (BOS)."""
    if not isinstance(pp, dict):
        return False
    if pp.get("type") == "Sequence":
        return any(post_processor_adds_bos(p) for p in pp.get("processors", []))
    single = pp.get("single") or []
    return pp.get("type") == "TemplateProcessing" and bool(single) and "SpecialToken" in single[0]


def first_id(x):
    return x[0] if isinstance(x, list) else x


def load_tokenizer(path, config=None):
    """The tokenizer stored in a checkpoint directory, or None when it has no tokenizer files."""
    path, config = Path(path), config or {}
    tcfg_file = path / "tokenizer_config.json"
    tcfg = read_json(tcfg_file, "tokenizer config") if tcfg_file.is_file() else {}
    if not isinstance(tcfg, dict):
        raise UserError(f"{tcfg_file} is not a JSON object: not a tokenizer config")
    if (path / "tokenizer.model").is_file():
        f = path / "tokenizer.model"
        try:
            tok = tiktoken_model_file(f) if is_tiktoken_file(f) else SentencePieceTokenizer(f)
        except (RuntimeError, ValueError, OSError) as e:  # the libraries' errors do not name the file
            raise UserError(f"{f}: not a readable tokenizer model ({str(e).splitlines()[0]})") from None
    elif (path / "tokenizer.json").is_file():
        tok, tj = bpe_from_tokenizer_json(path / "tokenizer.json")
        tok.add_bos = post_processor_adds_bos(tj.get("post_processor"))
    else:
        return None
    for attr in ("bos", "eos"):
        cid = first_id(config.get(f"{attr}_token_id"))
        if cid is not None:
            setattr(tok, f"{attr}_id", cid)
    if "add_bos_token" in tcfg:
        tok.add_bos = bool(tcfg["add_bos_token"])
    return tok
