"""Every CLI path under CUDA's device rules (tests/devicerules.py) on one GPU, two GPUs and --offload, on a CPU:
no op may mix devices. The harness itself must catch planted violations."""
import pytest
import torch

import badinputs
import baselines
import excise
import quantize
import search
import tune
import eval as ev
from conftest import FIXTURES
from devicerules import CudaRules

LAYOUTS = {"cuda": ["--device", "cuda"], "cuda:0,cuda:1": ["--devices", "cuda:0,cuda:1"],
           "offload": ["--device", "cuda", "--offload"]}
SMALL = ["--nsamples", "2", "--seqlen", "16"]


# ---------------------------------------------------------------- the harness catches what CUDA refuses

def test_planted_violations_are_caught_and_legal_code_passes():
    with CudaRules() as rules:
        a, b = torch.ones(3).to("cuda:0"), torch.ones(3, device="cuda:1")
        assert a.device == torch.device("cuda", 0) and (a * 2).device == a.device and torch.cuda.is_available()
        legal = [a + torch.tensor(2.0), a[torch.tensor([0, 2])], a.cpu() + torch.ones(3), b.to(a.device) + a]
        assert rules.violations == [] and [t.device.type for t in legal] == ["cuda", "cuda", "cpu", "cuda"]
        _ = a + b  # two GPUs
        _ = torch.nn.Linear(3, 2)(a[None])  # CPU weights, GPU input
        _ = torch.randn(3, generator=torch.Generator(), device="cuda")  # a CPU generator for a GPU tensor
        _ = a.float().sum().item() + float(a[0])  # two host synchronisations
    assert len(rules.violations) == 3, rules.violations
    assert "cuda:0" in rules.violations[0] and "cuda:1" in rules.violations[0]
    assert "['cpu', 'cuda:0']" in rules.violations[1] and "generator" in rules.violations[2]
    assert rules.syncs["item"] == 2
    assert not torch.cuda.is_available() or torch.backends.cuda.is_built()  # the answers end with the rules


def test_gradients_come_back_to_the_device_of_their_weights():
    with CudaRules() as rules:
        w0, w1 = (torch.randn(4, 4).to(f"cuda:{i}").requires_grad_() for i in (0, 1))
        x = torch.randn(2, 4).to("cuda:0")
        ((x @ w0).to("cuda:1") @ w1).float().sum().backward()  # a same-dtype hop between devices
        assert w0.grad.device == torch.device("cuda", 0) and w1.grad.device == torch.device("cuda", 1)
    assert rules.violations == []


# ---------------------------------------------------------------- every CLI path in three layouts

def run(main, argv, layout):
    with CudaRules() as rules:
        main(argv + LAYOUTS[layout])
    assert rules.violations == [], rules.report()
    return rules


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny LLaMA with a byte tokenizer, its pruned checkpoint, and a GPTQ-packable tiny Qwen2."""
    tmp = tmp_path_factory.mktemp("devices")
    dense = badinputs.tiny(tmp, "dense")
    excise.main(["--ckpt", str(dense), "--layers", "2-3", "--out", str(tmp / "pruned")])
    return {"dense": dense, "pruned": tmp / "pruned", "packable": badinputs.packable(tmp)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_search(layout, tmp_path):
    tiny = str(FIXTURES / "tiny-llama2")
    for extra in ([], ["--cache-on-cpu"], ["--segments", "2"]):
        rules = run(search.main, ["--ckpt", tiny, "--prune-layers", "2", "--steps", "3", "--starts", "2",
                                  "--out", str(tmp_path / "s" / "_".join(extra))] + SMALL + extra, layout)
    assert rules.syncs.get("item", 0) > 0  # the loss is read on the host once per step: counted


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("method", baselines.METHODS)
def test_baselines(method, layout, tmp_path):
    run(baselines.main, ["--ckpt", str(FIXTURES / "tiny-llama2"), "--prune-layers", "2", "--method", method,
                         "--out", str(tmp_path / "b"), "--cache-on-cpu"] + SMALL, layout)


@pytest.mark.parametrize("layout", ["cuda", "cuda:0,cuda:1"])  # tune.py has no --offload
@pytest.mark.parametrize("method", ["full", "lora"])
def test_tune(method, layout, ckpts, tmp_path):
    run(tune.main, ["--ckpt", str(ckpts["pruned"]), "--out", str(tmp_path / "t"), "--method", method, "--steps", "2",
                    "--nsamples", "2", "--val-samples", "1", "--seqlen", "16", "--batch-size", "1"], layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("order", [[], ["--act-order"]], ids=["plain", "act-order"])
def test_quantize(order, layout, ckpts, tmp_path):
    run(quantize.main, ["--ckpt", str(ckpts["packable"]), "--out", str(tmp_path / "q")] + SMALL + order, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eval(layout, ckpts, tmp_path):
    dense, pruned = str(ckpts["dense"]), str(ckpts["pruned"])
    run(ev.main, ["--ckpt", dense, "--compare", pruned, "--ppl", "wikitext2", "--ppl-windows", "1", "--seqlen", "32",
                  "--tasks", "piqa,boolq", "--limit", "3"], layout)
    rules = run(ev.main, ["--ckpt", dense, "--compare", pruned, "--latency", "--seqlen", "16", "--new-tokens", "4",
                          "--runs", "5", "--warmup", "0"], layout)
    assert rules.syncs["synchronize"] > 0  # every clock read waits for the device
