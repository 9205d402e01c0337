"""GPTQ / RTN numerics and the packed GPTQ checkpoint layout, on random weights and tiny random models."""
import contextlib
import io
import json

import pytest
import torch

import load_weights as lw
import save_weights
from conftest import FIXTURES, need
from machinery.errors import UserError
from gptq_format import (SUPPORTED_BITS, check_quantization_config, dequantize, pack, pack_rows,
                         quantization_config, unpack_rows)
from model import Transformer, hf_state_dict
from gptq import gptq, grid, proxy_error, rtn
from latency import model_bytes
from quantize import check_flags, check_linears, input_hessian, packed_tensors, quantize_model

# a small Qwen2-style config whose Linear dims are multiples of 32: q/k/v biases and a tied head are covered
RAW = {"model_type": "qwen2", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True, "max_position_embeddings": 128}


def correlated_problem(O=48, I=256, n=2048, seed=0):
    """W (O, I) and calibration inputs X (I, n) with strongly correlated features, float64."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(I, I, generator=g, dtype=torch.float64) / I**0.5
    X = A @ torch.randn(I, n, generator=g, dtype=torch.float64) + 0.1 * torch.randn(I, n, generator=g, dtype=torch.float64)
    W = torch.randn(O, I, generator=g, dtype=torch.float64)
    return W, X


def hessian(X):
    return 2 * X @ X.t() / X.shape[1]


def quiet(fn, *args, **kw):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kw)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(lw.config_from_dict(RAW)).eval().requires_grad_(False)


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_unpack_roundtrip(bits):
    g = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 2**bits, (96, 40), generator=g)
    v[0], v[1] = 0, 2**bits - 1  # both ends of the range, incl. the int32 sign bit for full words
    packed = pack_rows(v, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 40)
    assert torch.equal(unpack_rows(packed, bits), v)


def int32(u):
    return u - (1 << 32) if u >= 1 << 31 else u


def test_pack_bit_positions_by_hand():
    col = lambda vals: torch.tensor(vals + [0] * (32 - len(vals)))[:, None]  # noqa: E731
    # 4 bits: value j at bits 4j..4j+3 of one word -> 0x87654321
    assert pack_rows(col([1, 2, 3, 4, 5, 6, 7, 8]), 4)[:, 0].tolist() == [int32(0x87654321), 0, 0, 0]
    assert pack_rows(col([1, 2, 3, 4]), 8)[:, 0].tolist() == [0x04030201, 0, 0, 0, 0, 0, 0, 0]
    assert pack_rows(col([0] * 16 + [3]), 2)[:, 0].tolist() == [0, 3]
    # 3 bits: value 10 straddles words 0/1 (2 low bits at 30-31, high bit at bit 0 of word 1),
    # value 21 straddles words 1/2 (low bit at bit 31, 2 high bits at bits 0-1 of word 2), value 11 at bits 1-3
    assert pack_rows(col([0] * 10 + [7]), 3)[:, 0].tolist() == [int32(0xC0000000), 1, 0]
    assert pack_rows(col([0] * 21 + [7]), 3)[:, 0].tolist() == [0, int32(0x80000000), 3]
    assert pack_rows(col([0] * 11 + [5]), 3)[:, 0].tolist() == [0, 5 << 1, 0]
    assert pack_rows(col([0] * 22 + [5]), 3)[:, 0].tolist() == [0, 0, 5 << 2]


def test_format_dequantize_matches_and_v2_offset():
    W, X = correlated_problem(O=64, I=128)
    res = gptq(W.float(), hessian(X).float(), 3, 32, act_order=True)
    t = pack(res.codes, res.scales, res.zeros, res.g_idx, 3)
    assert torch.equal(dequantize(**t, bits=3), res.dequantize())
    # gptq_v2 stores the zero point itself: repack without the -1 and read with offset 0
    qzeros_v2 = pack_rows(res.zeros.t(), 3).t()
    assert torch.equal(dequantize(t["qweight"], qzeros_v2, t["scales"], t["g_idx"], 3, zero_offset=0), res.dequantize())


# ---------------------------------------------------------------- GPTQ numerics

@pytest.mark.parametrize("group_size,act_order", [(-1, False), (64, False), (96, False), (32, True)])
def test_lazy_batch_updates_are_exact(group_size, act_order):
    W, X = correlated_problem()
    H = hessian(X)
    runs = [gptq(W, H, 3, group_size, act_order=act_order, blocksize=b) for b in (1, 128, 37)]
    for r in runs[1:]:
        assert torch.equal(r.codes, runs[0].codes)
        assert torch.equal(r.scales, runs[0].scales) and torch.equal(r.zeros, runs[0].zeros)


def test_proxy_error_is_the_output_error():
    W, X = correlated_problem(n=512)
    Q = rtn(W, 4).dequantize()
    direct = ((W @ X - Q @ X) ** 2).sum() / X.shape[1]
    assert proxy_error(W, Q, hessian(X)) == pytest.approx(float(direct), rel=1e-9)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 64])
@pytest.mark.parametrize("sym,act_order", [(False, False), (True, False), (False, True)])
def test_gptq_beats_rtn_on_known_hessian(bits, group_size, sym, act_order):
    W, X = correlated_problem()
    H = hessian(X)
    e_gptq = proxy_error(W, gptq(W, H, bits, group_size, sym, act_order).dequantize(), H)
    e_rtn = proxy_error(W, rtn(W, bits, group_size, sym).dequantize(), H)
    assert e_gptq < 0.8 * e_rtn


def test_identity_hessian_gives_rtn():
    # with uncorrelated inputs there is nothing to compensate: GPTQ must reduce to round-to-nearest
    W, _ = correlated_problem()
    H = torch.eye(W.shape[1], dtype=W.dtype)
    a, b = gptq(W, H, 4, 64), rtn(W, 4, 64)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


def test_act_order_static_groups():
    W, X = correlated_problem()
    # make the column order matter: scale the inputs so diag(H) is far from sorted
    X = X * torch.linspace(0.2, 3.0, X.shape[0], dtype=X.dtype).flip(0)[torch.randperm(X.shape[0])][:, None]
    H, gs = hessian(X), 64
    res = gptq(W, H, 4, gs, act_order=True)
    assert not torch.equal(torch.argsort(H.diagonal(), descending=True), torch.arange(W.shape[1]))
    assert res.scales.shape == (W.shape[1] // gs, W.shape[0]) and res.zeros.shape == res.scales.shape
    assert torch.equal(res.g_idx, torch.arange(W.shape[1]) // gs)
    # static: each group's grid is fixed from the original W, whatever order its columns were visited in
    for g in range(W.shape[1] // gs):
        s, z = grid(W[:, g * gs:(g + 1) * gs], 4, False)
        assert torch.equal(res.scales[g], s) and torch.equal(res.zeros[g], z.long())
    # and every stored code sits on its own group's grid
    Q = res.dequantize()
    recon = res.scales[res.g_idx].t() * (res.codes - res.zeros[res.g_idx].t())
    assert torch.equal(Q, recon) and res.codes.min() >= 0 and res.codes.max() <= 15
    # without act-order, later groups are fitted to the already-updated weights, so they differ
    dyn = gptq(W, H, 4, gs)
    assert torch.equal(dyn.scales[0], res.scales[0]) and not torch.equal(dyn.scales[1:], res.scales[1:])


# ---------------------------------------------------------------- the decoder loop and checkpoints

def test_input_hessian_captures_the_normed_inputs():
    model = tiny_model()
    x = torch.randn(3, 16, RAW["hidden_size"])
    cos, sin = model.rope(0, 16)
    layer = model.layers[0]
    H = input_hessian(layer, "self_attn.q_proj", x, cos, sin, rows=2)
    a = layer.input_layernorm(x).reshape(-1, RAW["hidden_size"])
    assert torch.allclose(H, 2 * a.t() @ a / a.shape[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits,group_size,act_order", [(2, -1, False), (3, 32, True), (4, 32, False), (8, -1, True)])
def test_checkpoint_reloads_to_the_same_weights(tmp_path, bits, group_size, act_order):
    model = tiny_model()
    tokens = torch.randint(0, RAW["vocab_size"], (4, 64), generator=torch.Generator().manual_seed(1))
    settings = dict(method="gptq", bits=bits, group_size=group_size, sym=False, act_order=act_order,
                    blocksize=128, percdamp=0.01)
    results, rows = quiet(quantize_model, model, tokens, settings)
    assert len(rows) == 7 * RAW["num_hidden_layers"] and all(r["proxy_error"] >= 0 for r in rows)
    src, out = tmp_path / "src", tmp_path / "q"
    dense = tiny_model()
    save_weights.save_checkpoint(src, RAW, hf_state_dict(dense))
    cfg = dict(RAW, quantization_config=quantization_config(bits, group_size, False, act_order, 0.01, "gptq"))
    save_weights.save_checkpoint(out, cfg, packed_tensors(model, results, bits, torch.float32))
    q, _ = lw.load(out)
    for name, res in results.items():
        assert torch.equal(q.get_submodule(name).weight_dequantized(), res.dequantize()), name
        assert torch.equal(model.get_submodule(name).weight.float(), res.dequantize()), name
    assert torch.equal(q(tokens), model(tokens))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == bits
    # the Linears really shrink, on disk and in memory
    lin_dense = sum(t.numel() * 4 for n, t in hf_state_dict(dense).items() if "_proj.weight" in n)
    lin_q = sum(b.numel() * b.element_size() for n, b in q.named_buffers() if n.endswith("qweight"))
    assert lin_q == lin_dense * bits // 32
    assert model_bytes(q) < model_bytes(dense)
    assert (out / "model.safetensors").stat().st_size < (src / "model.safetensors").stat().st_size


def test_data_free_rtn_matches_rtn():
    model, ref = tiny_model(), tiny_model()
    settings = dict(method="rtn", bits=4, group_size=32, sym=True, act_order=False, blocksize=128, percdamp=0.01)
    results, rows = quantize_model(model, None, settings)
    W = ref.layers[1].mlp.down_proj.weight
    assert rows == [] and torch.equal(results["layers.1.mlp.down_proj"].dequantize(), rtn(W, 4, 32, True).dequantize())


# ---------------------------------------------------------------- bad input

def test_bad_settings_are_clear_errors():
    model = tiny_model()
    ok = dict(bits=4, group_size=32, blocksize=128, percdamp=0.01, method="gptq", nsamples=8)
    with pytest.raises(ValueError, match="already quantized"):
        check_flags({"quantization_config": {"quant_method": "gptq", "bits": 4}}, **ok)
    with pytest.raises(ValueError, match="--bits 5 is not supported"):
        check_flags(RAW, **dict(ok, bits=5))
    with pytest.raises(ValueError, match="--group-size 0"):
        check_flags(RAW, **dict(ok, group_size=0))
    with pytest.raises(ValueError, match="needs calibration data"):
        check_flags(RAW, **dict(ok, nsamples=0))
    check_linears(model, ok["group_size"])  # the model itself is fine
    with pytest.raises(ValueError, match="cannot be written"):
        pack(torch.zeros(32, 32, dtype=torch.long), torch.ones(1, 32), torch.zeros(1, 32, dtype=torch.long),
             torch.zeros(32, dtype=torch.long), 4)
    for bad, msg in [({"bits": 5}, "bits = 5"), ({"group_size": 0}, "group_size = 0"),
                     ({"checkpoint_format": "marlin"}, "checkpoint_format"), ({"quant_method": "awq"}, "awq")]:
        with pytest.raises(ValueError, match=msg):
            check_quantization_config({**quantization_config(4, 128, False, False, 0.01, "gptq"), **bad})


def test_unpackable_dimensions_are_named():
    tiny = need(FIXTURES / "tiny-llama2")  # intermediate_size 176: not a multiple of 32
    model, _ = lw.load(tiny)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.gate_proj: out_features = 176"):
        check_linears(model, 32)


def test_ragged_groups_are_noted(capsys):
    model = tiny_model()
    check_linears(model, 48)
    assert "does not divide" in capsys.readouterr().out


def test_short_calibration_warns_with_token_count(capsys, tmp_path):
    from data import calibration_windows
    from quantize import check_calibration

    class Chars:  # a stand-in tokenizer: one token per character
        def encode(self, text, bos=False):
            return [ord(c) % 256 for c in text]

    text = tmp_path / "calib.txt"
    text.write_text("short calibration text. " * 40)
    tokens, _, _ = calibration_windows(Chars(), str(text), 4, 64)
    check_calibration(tokens, max_in=128)
    out = capsys.readouterr().out
    assert tokens.shape == (4, 64)
    assert "only 256 calibration tokens for Linears with up to 128 inputs" in out and "overlap" not in out
    check_calibration(calibration_windows(Chars(), str(text), 40, 64)[0], max_in=128)
    out = capsys.readouterr().out
    assert "only 960 tokens for 2,560 requested" in out and "calibration tokens for" not in out


def test_missing_quantized_tensor_is_named(tmp_path):
    model = tiny_model()
    results, _ = quantize_model(model, None, dict(method="rtn", bits=4, group_size=-1, sym=False, act_order=False,
                                                  blocksize=128, percdamp=0.01))
    tensors = packed_tensors(model, results, 4, torch.float32)
    del tensors["model.layers.1.mlp.up_proj.scales"]
    save_weights.save_checkpoint(tmp_path / "q", dict(RAW, quantization_config=quantization_config(4, -1, False, False, 0.01, "rtn")),
                       tensors)
    with pytest.raises(UserError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.scales'"):
        lw.load(tmp_path / "q")
