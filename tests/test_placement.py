"""Devices, slices of layers over several devices, streamed (offloaded) layers, random: models.

There is no GPU here, so "several devices" is cpu,cpu and streaming is CPU -> CPU: the same code path
(pinned forwards, hidden states following their layers, fresh layer copies, checkpointed backward) as
on GPUs, checked against the plain in-memory model.
"""
import json

import pytest
import torch

import excise
import load_weights
import quantize
import search
import tune
from conftest import FIXTURES, need
from machinery import devices, placement
from teacher import build_teacher, kl_backward, removed_kl, run_layers

TINY = "tiny-llama3"
MODES = {"cpu,cpu": dict(devices="cpu,cpu"), "offload": dict(device="cpu", offload=True)}


def placed(mode, name=TINY, **kw):
    return placement.load_placed(need(FIXTURES / name), **MODES[mode], **kw)[0]


def tokens(n=3, T=20, seed=0):
    return torch.randint(0, 512, (n, T), generator=torch.Generator().manual_seed(seed))


def gate_grad(model, ids):
    """Gradient of the chunked KL with respect to a soft keep vector, as one gate step computes it."""
    teacher = build_teacher(model, ids)
    keep = torch.tensor([1.0, 0.9, 0.3, 0.5, 1.0, 0.8], requires_grad=True)
    h = run_layers(model, teacher.hidden[1], 1, keep=keep)
    loss = kl_backward(model, h, teacher.final, chunk=16)
    return loss, keep.grad


def test_split_layers_balances_bytes_and_keeps_slices_contiguous():
    # 8 layers of 10 bytes, embedding 20 on the first device, head 20 on the last: 120 bytes, 60 each
    assert placement.split_layers(8, 10, 20, 20, [1, 1]) == [0, 0, 0, 0, 1, 1, 1, 1]
    # a device with three times the free memory takes three times the share
    assert placement.split_layers(8, 10, 0, 0, [1, 3]) == [0, 0, 1, 1, 1, 1, 1, 1]
    # the embedding's weight pushes layers off the first device
    assert placement.split_layers(4, 10, 30, 0, [1, 1]) == [0, 1, 1, 1]
    split = placement.split_layers(80, 1, 2, 2, [1, 1, 1, 1])
    assert split == sorted(split) and set(split) == {0, 1, 2, 3}


@pytest.mark.parametrize("mode", list(MODES))
def test_logits_and_gate_gradients_equal_the_plain_model(mode):
    plain, _ = load_weights.load(need(FIXTURES / TINY))
    model = placed(mode)
    ids = tokens()
    assert torch.equal(model(ids), plain(ids))
    keep = torch.tensor([1.0, 0.2, 0.7, 0.0, 1.0, 0.5])
    assert torch.equal(model(ids, keep=keep), plain(ids, keep=keep))
    loss, grad = gate_grad(model, ids)
    want_loss, want_grad = gate_grad(plain, ids)
    assert loss == want_loss and grad.abs().sum() > 0
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)
    assert removed_kl(model, build_teacher(model, ids), [2, 3]) == removed_kl(plain, build_teacher(plain, ids), [2, 3])
    assert all(p.grad is None for p in model.parameters())


def test_offload_keeps_the_stored_weights_and_streams_the_compute_dtype():
    model = placed("offload", dtype="bfloat16")
    # the layers stay as stored (fp32 safetensors, memory-mapped), the resident parts are in bf16
    assert model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    fresh = placement.on_device(model, 0)
    assert fresh.mlp.up_proj.weight.dtype == torch.bfloat16
    assert fresh.mlp.up_proj.weight.data_ptr() != model.layers[0].mlp.up_proj.weight.data_ptr()
    assert model(tokens()).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", list(MODES))
def test_gptq_codes_equal_the_plain_model(mode):
    settings = dict(method="gptq", bits=4, group_size=32, sym=False, act_order=False, blocksize=128, percdamp=0.01)
    ids = tokens(4, 32, seed=1)
    plain, _ = load_weights.load(need(FIXTURES / TINY))
    model = placed(mode)
    want, _ = quantize.quantize_model(plain, ids, settings)
    got, _ = quantize.quantize_model(model, ids, settings)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name].codes, want[name].codes), name
        assert torch.equal(got[name].scales, want[name].scales), name


def test_tuned_weights_equal_on_two_slices(tmp_path):
    src = need(FIXTURES / TINY)
    excise.run(src, tmp_path / "pruned", layers="2-3")
    kw = dict(steps=3, lr=3e-3, batch_size=2, nsamples=4, val_samples=2, seqlen=16, log_every=100)
    one = tune.run(tmp_path / "pruned", tmp_path / "one", device="cpu", **kw)
    two = tune.run(tmp_path / "pruned", tmp_path / "two", devices="cpu,cpu", **kw)
    assert one["losses"] == two["losses"]
    a, b = load_weights.load(tmp_path / "one")[0], load_weights.load(tmp_path / "two")[0]
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_bf16_search_picks_the_fp32_block():
    """On a fixture (the embedded model's bf16-vs-fp32 search is measured in docs/scale-devices.md)."""
    blocks = []
    for dtype in ("float32", "bfloat16"):
        model = placement.load_placed(need(FIXTURES / "tiny-qwen2"), device="cpu", dtype=dtype)[0]
        teacher = build_teacher(model, tokens(8, 32, seed=2))
        res = search.search(model, teacher, 2, starts=2, steps=6, log_every=100)
        blocks.append(res["removed_layers"])
    assert blocks[0] == blocks[1]


def test_random_models_are_seeded_marked_and_refused_where_quality_matters(tmp_path, capsys):
    name = f"random:{need(FIXTURES / TINY)}"
    a = placement.load_placed(name, device="cpu", seed=3)[0]
    b = placement.load_placed(name, device="cpu", offload=True, seed=3)[0]
    c = placement.load_placed(name, device="cpu", seed=4)[0]
    ids = tokens()
    assert torch.equal(a(ids), b(ids)) and not torch.equal(a(ids), c(ids))
    assert "random weights" in capsys.readouterr().out
    rep = search.run(name, tmp_path / "s", prune_layers=2, nsamples=2, seqlen=8, device="cpu", steps=2, starts=1)
    assert "random weights" in rep["random_weights"]
    assert "random_weights" in json.loads((tmp_path / "s" / "report.json").read_text())
    with pytest.raises(ValueError, match="random weights"):
        excise.run(name, tmp_path / "e", layers="1")
    with pytest.raises(ValueError, match="random weights"):
        tune.run(name, tmp_path / "t")
    with pytest.raises(ValueError, match="random weights"):
        search.run(name, tmp_path / "s2", prune_layers=2, excise_to=tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="configs/no-such-model"):
        placement.load_placed("random:no-such-model", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_error(capsys):
    with pytest.raises(ValueError, match="CUDA is not available"):
        devices.from_flags("cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        devices.from_flags(devices="auto")
    with pytest.raises(SystemExit):
        search.main(["--ckpt", str(FIXTURES / TINY), "--prune-layers", "2", "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "CUDA is not available" in err
    with pytest.raises(ValueError, match="not both"):
        devices.from_flags("cpu", devices="cpu,cpu")
    with pytest.raises(ValueError, match="one device"):
        devices.from_flags(devices="cpu,cpu", offload=True)


def test_defaults_follow_the_device():
    assert devices.from_flags("cpu") == ([torch.device("cpu")], torch.float32)
    assert devices.from_flags("cpu", "bfloat16")[1] == torch.bfloat16


def test_gpu_check_runs_in_smoke_mode():
    import benchmarks.gpu_check as gc

    text = gc.report(smoke=True, device=torch.device("cpu"))
    assert "| tiny-qwen3 |" in text and "teacher pass, --offload" in text and "GPTQ of layer 0" in text
    assert text.count("-> 4 |") == 2  # both latency rows: 6 layers, 30% excised


@pytest.mark.parametrize("mode", list(MODES))
def test_kv_cache_decoding_and_eval_run_through_the_placement(mode, tmp_path):
    import eval as ev

    plain, _ = load_weights.load(need(FIXTURES / TINY))
    model = placed(mode)
    prompt = tokens(1, 8)
    assert torch.equal(model.generate(prompt, 6), plain.generate(prompt, 6))
    res = ev.run(str(FIXTURES / TINY), latency=True, seqlen=16, new_tokens=2, json_out=tmp_path / "e.json",
                 **{"devices": MODES[mode].get("devices"), "device": MODES[mode].get("device"),
                    "offload": MODES[mode].get("offload", False)})
    assert res["latency"]["decode_tok_s"] > 0 and res["settings"]["offload"] == (mode == "offload")


def mapped_files(ptr):
    """The files whose memory mapping holds address ptr (Linux /proc/self/maps)."""
    out = []
    for line in open("/proc/self/maps"):
        parts = line.split()
        lo, hi = (int(a, 16) for a in parts[0].split("-"))
        if lo <= ptr < hi and len(parts) >= 6:
            out.append(parts[5])
    return out


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")
def test_offloaded_layers_are_the_memory_mapped_safetensors():
    model = placed("offload", dtype="bfloat16")
    for p in model.layers[3].parameters():
        assert any(f.endswith("model.safetensors") for f in mapped_files(p.data_ptr())), "a copy, not the file"
    # the resident parts were cast to bf16: those are copies, as they should be
    assert not any(f.endswith(".safetensors") for f in mapped_files(model.embed_tokens.weight.data_ptr()))


def test_llama2_70b_in_bf16_splits_over_two_80gb_gpus():
    from model import Config, Transformer

    # LLaMA-2-70B's architecture (public config.json facts); meta tensors: no memory
    cfg = Config("llama", vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                 num_kv_heads=8)
    with torch.device("meta"):
        model = Transformer(cfg)
    b = torch.bfloat16
    split = placement.split_layers(80, placement.nbytes(model.layers[0], b), placement.nbytes(model.embed_tokens, b),
                                   placement.nbytes(model.norm, b) + placement.nbytes(model.lm_head, b), [80, 80])
    assert split == [0] * 40 + [1] * 40
    per_device = [placement.nbytes(model.layers[0], b) * split.count(d) + placement.nbytes(model.lm_head, b)
                  for d in (0, 1)]
    # 138 GB in all: about 64 GiB of weights per 80 GB GPU, the rest free for caches and activations
    assert 64 * 2**30 < max(per_device) < 66 * 2**30
