"""The hand-written decoder against logits from an independent implementation, and its invariants."""
import copy

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, need
from load_weights import load


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


def cached_logits(model, ids, cache, prompt=20, chunk=1):
    """Logits of ids (B, T) fed as a prompt, then `chunk` tokens at a time, through one cache."""
    steps = [model(ids[:, :prompt], cache=cache)]
    steps += [model(ids[:, t:t + chunk], cache=cache) for t in range(prompt, ids.shape[1], chunk)]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-qwen3", "tiny-qwen2"])
def test_static_cache_decoding_equals_full_forward_and_reference(name):
    model, _ = load(FIXTURES / name)
    ids, want = reference(FIXTURES / name)
    B, T = ids.shape
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(B, T + 3)  # preallocated: more positions than used
        one = cached_logits(model, ids, cache)
        assert cache.length == T
        # the same memory serves a second, different prompt after reset, several tokens per step
        cache.reset()
        other = ids.flip(1)
        again = cached_logits(model, other, cache, prompt=7, chunk=5)
        want_other = model(other)
    assert torch.allclose(one, full, atol=1e-4) and (one - want).abs().max().item() < 1e-4
    assert torch.allclose(again, want_other, atol=1e-4)


def test_cache_refuses_more_tokens_than_it_holds():
    model, _ = load(FIXTURES / "tiny-llama3")
    cache = model.make_cache(1, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_last_only_is_the_last_row_of_the_full_logits():
    model, _ = load(FIXTURES / "tiny-qwen3")
    ids, _ = reference(FIXTURES / "tiny-qwen3")
    with torch.no_grad():
        full, last = model(ids), model(ids, last_only=True)
    assert last.shape == (ids.shape[0], 1, model.cfg.vocab_size)
    assert torch.allclose(last[:, 0], full[:, -1], atol=1e-5)


@pytest.mark.parametrize("T,S", [(1, 9), (4, 9), (9, 9)])
def test_gqa_without_repetition_equals_repeated_keys(T, S):
    """attend() lets query head h read K/V head h // n_rep; the reference repeats K and V and masks by hand."""
    from model import attend

    cfg = load(FIXTURES / "tiny-llama3")[0].cfg
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    assert nkv < nh  # the fixture has grouped-query attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, t, hd, generator=g) for n, t in ((nh, T), (nkv, S), (nkv, S)))
    kr, vr = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)  # (B, nh, S, hd)
    scores = q @ kr.transpose(-1, -2) / hd**0.5  # (B, nh, T, S)
    allowed = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]  # new token t sees positions <= S-T+t
    want = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vr
    assert torch.allclose(attend(q, k, v), want, atol=1e-5)


def test_embedded_generate_reuses_its_cache_for_a_second_prompt(smollm2):
    model, tok = smollm2
    a = torch.tensor([tok.encode("The capital of France is")])
    b = torch.tensor([tok.encode("One, two, three,")])
    cache = model.make_cache(1, 64)
    first = model.generate(a, 5, cache=cache)
    second = model.generate(b, 5, cache=cache)
    assert torch.equal(second, model.generate(b, 5)) and torch.equal(first, model.generate(a, 5))
    # each generated token is the argmax of a full forward over everything before it
    with torch.no_grad():
        full = model(second)[0]  # (T, V)
    assert torch.equal(full[b.shape[1] - 1:-1].argmax(-1), second[0, b.shape[1]:])


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


def test_without_shares_the_weights_and_equals_the_cut_model():
    model, _ = load(FIXTURES / "tiny-qwen2")
    ids, _ = reference(FIXTURES / "tiny-qwen2")
    view = model.without([1, 4])
    assert view.cfg.num_layers == 4 and model.cfg.num_layers == 6 and len(model.layers) == 6
    assert view.layers[1] is model.layers[2] and view.embed_tokens.weight is model.embed_tokens.weight
    keep = torch.ones(6)
    keep[[1, 4]] = 0
    cache = view.make_cache(1, ids.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(view(ids), model(ids, keep=keep), atol=1e-5, rtol=0)
        torch.testing.assert_close(view(ids[:1], cache=cache), model(ids[:1], keep=keep), atol=1e-5, rtol=0)


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
