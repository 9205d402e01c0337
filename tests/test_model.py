"""The hand-written decoder against logits from an independent implementation, and its invariants."""
import copy

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, need
from load_weights import load
from model import KVCache


def reference(d):
    ref = load_file(need(d / "reference.safetensors"))
    return ref["input_ids"], ref["logits"]


def test_tiny_fixture_logits_match_reference(tiny_dir):
    model, tok = load(tiny_dir)
    ids, want = reference(tiny_dir)
    with torch.no_grad():
        got = model(ids)
    assert tok is None
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4


def test_embedded_logits_match_reference(smollm2):
    model, _ = smollm2
    ids, want = reference(FIXTURES / "smollm2-135m")
    with torch.no_grad():
        got = model(ids)
    assert (got - want).abs().max().item() < 1e-3


def test_embedded_greedy_continuation_is_paris(smollm2):
    model, tok = smollm2
    ids = torch.tensor([tok.encode("The capital of France is")])
    out = model.generate(ids, 3, eos_id=tok.eos_id)
    assert tok.decode(out[0, ids.shape[1]:].tolist()).startswith(" Paris.")


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-qwen3", "tiny-qwen2"])
def test_kv_cache_decoding_equals_full_forward(name):
    model, _ = load(FIXTURES / name)
    ids, _ = reference(FIXTURES / name)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.cfg.num_layers)
        # a prompt of 20 tokens, then one token at a time
        steps = [model(ids[:, :20], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(20, ids.shape[1])]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-4)


def test_keep_zero_equals_model_without_that_layer(tiny_dir):
    model, _ = load(tiny_dir)
    ids, _ = reference(tiny_dir)
    i = 2
    keep = torch.ones(model.cfg.num_layers)
    keep[i] = 0
    smaller = copy.deepcopy(model)
    del smaller.layers[i]
    smaller.cfg.num_layers -= 1
    with torch.no_grad():
        gated, cut, dense = model(ids, keep=keep), smaller(ids), model(ids)
    assert torch.allclose(gated, cut, atol=1e-5)
    assert not torch.allclose(gated, dense, atol=1e-2)  # the layer mattered, so the test can fail


def test_keep_one_is_dense_and_gradients_reach_keep():
    model, _ = load(FIXTURES / "tiny-llama3")
    ids, _ = reference(FIXTURES / "tiny-llama3")
    keep = torch.full((model.cfg.num_layers,), 1.0, requires_grad=True)
    logits = model(ids, keep=keep)
    with torch.no_grad():
        assert torch.allclose(logits, model(ids), atol=1e-5)
    logits.logsumexp(-1).mean().backward()
    assert keep.grad is not None and torch.isfinite(keep.grad).all() and keep.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # frozen weights get no gradients


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_stays_close_to_fp32(dtype):
    d = FIXTURES / "tiny-qwen2"
    ids, want = reference(d)
    model, _ = load(d, dtype=dtype)
    assert model.embed_tokens.weight.dtype == dtype
    with torch.no_grad():
        got = model(ids).float()
    # same argmax almost everywhere and small absolute error relative to the logit scale
    assert (got - want).abs().max().item() < 0.05 * want.abs().max().item()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() > 0.95


def test_mistral_sliding_window_is_enforced_not_ignored(tmp_path):
    import json
    import shutil

    d = tmp_path / "mistral"
    shutil.copytree(FIXTURES / "tiny-llama2", d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral", "sliding_window": 32}))
    model, _ = load(d)
    ids, want = reference(FIXTURES / "tiny-llama2")
    with torch.no_grad():
        assert torch.allclose(model(ids[:, :32]), want[:, :32], atol=1e-4)
        with pytest.raises(ValueError, match="sliding window of 32"):
            model(ids)
