"""Tokenizers against the reference tokenizer's ids, and hand-made tokenizers of each file format."""
import base64
import hashlib
import json

import numpy as np
import pytest

from conftest import FIXTURES, WHOLE, need
from data import wikitext_text
from tokenizer import byte_decoder, load_tokenizer


def test_embedded_tokenizer_matches_golden_ids(smollm2):
    _, tok = smollm2
    for item in json.loads(need(FIXTURES / "smollm2-135m" / "tokenizer_golden.json").read_text()):
        assert tok.encode(item["text"]) == item["ids"], item["text"]
        assert tok.decode(item["ids"]) == item["text"]


@pytest.mark.whole_data
@pytest.mark.parametrize("fname", ["wiki.test.raw", "wiki.valid.raw"])
def test_embedded_tokenizer_matches_golden_on_all_of_wikitext2(smollm2, fname):
    _, tok = smollm2
    golden = json.loads(need(FIXTURES / "smollm2-135m" / "tokenizer_golden_wikitext2.json").read_text())[fname]
    ids = tok.encode(wikitext_text(need(WHOLE / "wikitext-2-raw" / fname)))
    assert len(ids) == golden["n_tokens"]
    assert ids[:64] == golden["first_64"]
    assert hashlib.sha256(np.asarray(ids, dtype="<i4").tobytes()).hexdigest() == golden["sha256"]


def test_sentencepiece_model_made_here_round_trips(tmp_path):
    import sentencepiece as spm
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"layer {i} of the pruned model keeps {i * 7} heads and drops the rest" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=60,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    tok = load_tokenizer(tmp_path, {"bos_token_id": 1, "eos_token_id": 2})
    text = "the pruned layer keeps 42 heads"
    ids = tok.encode(text, bos=True)
    assert ids[0] == 1 and tok.add_bos and len(ids) > 3
    assert tok.decode(ids[1:]) == text


def write_tiktoken_file(path, merges):
    """256 single bytes, then each merge in order (rank = line number), like LLaMA-3's tokenizer.model."""
    ranks = [bytes([b]) for b in range(256)] + merges
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))


def test_tiktoken_format_model_made_here(tmp_path):
    write_tiktoken_file(tmp_path / "tokenizer.model", [b"ab", b"abc", b" ab", b" abc"])
    tok = load_tokenizer(tmp_path)
    assert tok.encode("abc abc") == [257, 259]
    assert tok.encode("abd", bos=True) == [260, 256, ord("d")]  # BOS = first id after the 260 ranks
    assert tok.encode("<|end_of_text|>") == [261]  # special tokens stay whole
    assert tok.decode(tok.encode("abc déjà vu\n")) == "abc déjà vu\n"


def test_byte_level_tokenizer_json_with_ids_out_of_merge_order(tmp_path):
    enc = {b: c for c, b in byte_decoder().items()}
    tokens = [enc[b] for b in range(256)]
    # the merged tokens get ids in the opposite order of their merges: ranks must follow the merges
    vocab = {t: i for i, t in enumerate(tokens)} | {"Ġt": 300, "he": 299, "Ġthe": 298}
    tj = {"model": {"type": "BPE", "vocab": vocab, "merges": ["Ġ t", "h e", "Ġt he"]},
          "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
          "added_tokens": [{"id": 301, "content": "<|end|>", "special": True}], "normalizer": None}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    tok = load_tokenizer(tmp_path, {"eos_token_id": 301})
    assert tok.encode("he the") == [299, 298]
    assert tok.encode(" th<|end|>") == [300, ord("h"), 301]
    assert tok.eos_id == 301 and tok.decode([299, 298, 301]) == "he the<|end|>"


def test_unsupported_tokenizer_json_is_a_clear_error(tmp_path):
    tj = {"model": {"type": "Unigram", "vocab": []}, "pre_tokenizer": None}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match="only byte-level BPE"):
        load_tokenizer(tmp_path)
    tj = {"model": {"type": "BPE", "vocab": {}, "merges": []}, "pre_tokenizer": {"type": "Metaspace"}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match="pre_tokenizer"):
        load_tokenizer(tmp_path)


def test_directory_without_tokenizer_files_gives_none(tmp_path):
    assert load_tokenizer(tmp_path) is None
