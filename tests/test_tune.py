"""Endpoint tuning: which layers are endpoints (hand-worked), the cached prefix equals a full forward,
LoRA merges exactly, a tuned checkpoint changes only the tuned layers, bad input is refused."""
import json

import pytest
import torch
from safetensors import safe_open

import excise
import load_weights
import tune
from conftest import FIXTURES, need


@pytest.mark.parametrize("kept, L, want", [
    ([0, 1, 2, 6, 7, 8, 9], 10, [2, 3]),  # cut 3-5: the layers on both sides
    ([3, 4, 5, 6, 7, 8, 9], 10, [0]),  # cut at the bottom: only the layer above
    ([0, 1, 2, 3, 4, 5, 6], 10, [6]),  # cut at the top: only the layer below
    ([0, 1, 4, 5, 7, 8, 9], 10, [1, 2, 3, 4]),  # two cuts, 2-3 and 6
])
def test_endpoints(kept, L, want):
    assert tune.endpoints(kept, L) == want


def test_choose_layers():
    pruning = {"kept_layers": [0, 1, 2, 6, 7, 8, 9], "source_num_layers": 10}
    assert tune.choose_layers("endpoints", pruning, 7) == [2, 3]
    assert tune.choose_layers("all", None, 3) == [0, 1, 2]
    assert tune.choose_layers("5,1-2", None, 7) == [1, 2, 5]
    with pytest.raises(ValueError, match="unknown layer"):
        tune.choose_layers("7", pruning, 7)
    with pytest.raises(ValueError, match="pruning.json"):
        tune.choose_layers("endpoints", None, 7)


@pytest.fixture
def pruned_tiny(tmp_path):
    """tiny-llama3 (6 layers) with layers 2-3 cut out: endpoints are pruned layers 1 and 2."""
    src = need(FIXTURES / "tiny-llama3")
    out = tmp_path / "pruned"
    excise.run(src, out, layers="2-3")
    return src, out


def test_cached_prefix_kl_equals_full_forward(pruned_tiny):
    src, out = pruned_tiny
    dense, _ = load_weights.load(src)
    small, _ = load_weights.load(out)
    # a teacher whose final norm differs from the student's: its log-probs must come from its own head
    dense.norm.weight.mul_(1.5)
    ids = torch.randint(0, dense.cfg.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    # independent route: full logits of both models, KL per token, mean
    logp, logq = dense(ids).log_softmax(-1), small(ids).log_softmax(-1)
    want = (logp.exp() * (logp - logq)).sum(-1).mean()
    first = 1
    teacher_h = tune.teacher_states(dense, ids)
    got = tune.mean_kl(small, tune.frozen_prefix(small, ids, first), dense, teacher_h, first, batch=2, chunk=7)
    assert got == pytest.approx(float(want), rel=1e-5)
    assert got > 1e-3  # the cut changed the model, so the check is not 0 == 0


def test_lora_starts_at_base_and_merges_exactly():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 9, bias=False)
    x = torch.randn(2, 5, 12)
    y0 = base(x).detach()
    lora = tune.LoRALinear(base, rank=3, alpha=6.0)
    torch.testing.assert_close(lora(x), y0, atol=0, rtol=0)  # B = 0
    with torch.no_grad():
        lora.B.normal_()
    y = lora(x).detach()
    assert (y - y0).abs().max() > 1e-2
    merged = lora.merged()
    torch.testing.assert_close(merged(x), y, atol=1e-5, rtol=1e-5)


def layer_tensors(path):
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("method", ["full", "lora"])
def test_tuning_changes_only_the_endpoints_and_lowers_kl(pruned_tiny, tmp_path, method):
    src, pruned = pruned_tiny
    out = tmp_path / "tuned"
    rep = tune.run(pruned, out, method=method, steps=12, lr=3e-3, batch_size=2, nsamples=8, val_samples=4,
                    seqlen=32, log_every=100)
    assert rep["tuned_layers"] == [1, 2] and rep["tuned_source_layers"] == [1, 4]
    assert rep["heldout_kl"]["after"] < rep["heldout_kl"]["before"]
    before, after = layer_tensors(pruned), layer_tensors(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    tuned = {k for k in before if k.startswith(("model.layers.1.", "model.layers.2."))}
    assert changed and changed <= tuned
    if method == "lora":
        # adapters sit on the Linears only, and merge into their weights
        assert all(k.endswith("proj.weight") for k in changed)
        assert rep["trainable_parameters"] == 2 * 8 * sum(i + o for i, o in [(64, 64), (64, 32), (64, 32), (64, 64),
                                                                            (64, 176), (64, 176), (176, 64)])
    assert json.loads((out / "pruning.json").read_text()) == json.loads((pruned / "pruning.json").read_text())
    assert json.loads((out / "tuning.json").read_text())["tuned_layers"] == [1, 2]
    model, _ = load_weights.load(out)
    assert model.cfg.num_layers == 4


def test_nan_loss_writes_nothing(pruned_tiny, tmp_path):
    _, pruned = pruned_tiny
    with pytest.raises(FloatingPointError, match="nothing was written"):
        tune.run(pruned, tmp_path / "tuned", steps=5, lr=1e30, warmup=1, batch_size=2, nsamples=4, val_samples=2,
                  seqlen=16, log_every=100)
    assert not (tmp_path / "tuned").exists()


def test_bad_input(pruned_tiny, tmp_path):
    src, pruned = pruned_tiny
    other = need(FIXTURES / "tiny-qwen2")
    with pytest.raises(ValueError, match="not its source"):
        tune.run(pruned, tmp_path / "t", teacher=other, steps=1, nsamples=2, val_samples=1, seqlen=16)
    with pytest.raises(ValueError, match="pruning.json"):
        tune.run(src, tmp_path / "t", steps=1, nsamples=2, val_samples=1, seqlen=16)  # an unpruned checkpoint
    with pytest.raises(ValueError, match="at least 1"):
        tune.run(pruned, tmp_path / "t", steps=0)
    assert not (tmp_path / "t").exists()


def test_bf16_tuning_keeps_fp32_masters_and_writes_them(pruned_tiny, tmp_path):
    """In bf16 a small step rounds away in most weights; the fp32 masters keep all of it, and the checkpoint (fp32
    like its source) holds them."""
    _, pruned = pruned_tiny
    before = layer_tensors(pruned)
    tune.run(pruned, tmp_path / "t", dtype="bfloat16", steps=1, warmup=0, lr=1e-5, batch_size=1, nsamples=2,
             val_samples=1, seqlen=16, device="cpu")
    after = layer_tensors(tmp_path / "t")
    tuned = [k for k in after if k.startswith("model.layers.1.") and k.endswith("proj.weight")]
    start = {k: before[k].bfloat16().float() for k in tuned}  # the weights the bf16 run started from
    moved = sum(int((after[k] != start[k]).sum()) for k in tuned) / sum(after[k].numel() for k in tuned)
    rounded = sum(int((after[k].bfloat16().float() != start[k]).sum()) for k in tuned)
    assert after[tuned[0]].dtype == torch.float32 and moved > 0.95  # the fp32 update, in (nearly) every weight
    assert rounded / sum(after[k].numel() for k in tuned) < 0.5  # what a bf16 copy of it would have kept
