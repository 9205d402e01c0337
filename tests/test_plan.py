"""The memory plan: sizes from config.json alone (hand-computed parameter counts), placement invariants,
refusals naming a flag that fits, and the dry-run estimate against the measured peak RSS of real runs."""
import os
import subprocess
import sys

import pytest

import load_weights
import search
import tune
from conftest import DATA, ROOT
from machinery import memory, plan

GB = 2**30
# published parameter counts, summed by hand from the shapes: 80 x 856,162,304 per layer + 2 x 32000 x 8192 + 8192
LLAMA2_70B_PARAMS = 68_976_648_192


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """No checkpoint can be found: only the shipped configs."""
    monkeypatch.setenv("CLP_MODELS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))


def test_shipped_configs_match_published_sizes():
    cfg, _ = plan.config("random:llama2-70b")
    L, per = cfg.num_layers, memory.layer_params(cfg)
    assert L * per + 2 * cfg.vocab_size * cfg.hidden_size + cfg.hidden_size == LLAMA2_70B_PARAMS
    cfg8, _ = plan.config("random:llama3-8b")
    assert 32 * memory.layer_params(cfg8) + 2 * 128256 * 4096 + 4096 == 8_030_261_248


def test_parse_bytes():
    assert plan.parse_bytes("80GB") == 80 * GB == plan.parse_bytes("80 GiB")
    assert plan.parse_bytes("512MB") == 512 * 2**20
    with pytest.raises(Exception, match="not a size"):
        plan.parse_bytes("lots")


def test_slices_cover_the_model_contiguously_and_balance_it():
    cfg, _ = plan.config("random:llama2-70b")
    for n in (1, 2, 3, 8):
        parts = memory.slices(cfg, n)
        assert [i for r in parts for i in r] == list(range(cfg.num_layers))
        head, per = cfg.vocab_size * cfg.hidden_size, memory.layer_params(cfg)
        load = [per * len(r) + head * (j == 0) + head * (j == n - 1) for j, r in enumerate(parts)]
        assert max(load) - min(load) <= per + head


def test_llama2_70b_dry_run_from_config_alone_fits_two_80gb(no_weights, capsys):
    with pytest.raises(SystemExit) as e:
        # the budget changes only the pass counts: a dry-run may leave it out
        search.main(["--ckpt", "llama2-70b", "--dry-run", "--devices", "cuda:0,cuda:1", "--device-memory", "80GB",
                     "--dtype", "bfloat16"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "cuda:1" in out and "layer passes" in out and "no budget given" in out
    p = plan.plan_for("search", search.memory_plan, dict(ckpt="llama2-70b", prune_ratio=0.3, nsamples=16, seqlen=256, batch_size=1,
                                     kl_chunk=1024, steps=30, starts=4, halving=True, radius=1, dtype="bfloat16",
                                     devices="cuda:0,cuda:1", device_memory=80 * GB))
    # bf16 weights split over the two devices, nothing on the host
    assert sum(r.parts["weights"] for r in p.rows) == pytest.approx(2 * LLAMA2_70B_PARAMS, rel=1e-6)
    assert all(r.peak <= 80 * GB for r in p.rows[:2]) and p.fits


def test_a_plan_that_cannot_fit_is_refused_with_a_flag(no_weights, capsys):
    with pytest.raises(SystemExit) as e:
        search.main(["--ckpt", "llama2-70b", "--prune-ratio", "0.3", "--dry-run", "--device", "cuda",
                     "--device-memory", "80GB", "--dtype", "bfloat16"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit" in err and "--offload" in err and "--devices" in err


def test_fewer_samples_is_suggested_when_the_cache_is_what_overflows(capsys):
    with pytest.raises(SystemExit) as e:
        search.main(["--ckpt", "smollm2-135m", "--prune-layers", "6", "--nsamples", "64", "--device", "cpu",
                     "--device-memory", "2GB", "--dry-run"])
    assert e.value.code == 2
    assert "--nsamples" in capsys.readouterr().err


def test_every_cli_plans_from_config_alone(no_weights, capsys):
    import baselines
    import eval as evaluate
    import quantize

    def eval_main(argv):
        plan.check(evaluate.parse_args(argv), "eval", evaluate.memory_plan)

    common = ["--ckpt", "llama3-8b", "--dry-run", "--device", "cuda", "--device-memory", "80GB"]
    cases = [(search.main, ["--prune-layers", "8"]), (baselines.main, ["--prune-layers", "8"]),
             (tune.main, ["--teacher", "llama3-8b", "--train-layers", "11,12", "--out", "x"]),
             (quantize.main, ["--out", "x"]), (eval_main, ["--ppl", "wikitext2"])]
    for main, extra in cases:
        with pytest.raises(SystemExit) as e:
            main(extra + common)
        out = capsys.readouterr()
        assert e.value.code == 0, (main.__module__, out.err)
        assert "peak" in out.out and "layer passes" in out.out, main.__module__


def test_missing_weights_are_a_clear_error(no_weights, capsys):
    with pytest.raises(SystemExit):
        search.main(["--ckpt", "llama2-7b", "--prune-ratio", "0.3"])
    err = capsys.readouterr().err
    assert "configs/llama2-7b/config.json" in err and "weights are missing" in err


MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) if r.returncode == 0 else sys.exit(r.returncode)")


def peak_rss(args):
    """Peak RSS in bytes of a CLI run, measured by a fresh parent whose only child it is (ru_maxrss: KiB)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "CLP_DATA": str(DATA)}
    r = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, *args], capture_output=True, text=True,
                       cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1]) * 1024


def test_search_and_tune_estimates_within_20_percent_of_measured_peak(tmp_path):
    """The embedded model, fp32 on CPU, small settings where the caches and KL chunks are a real share of it."""
    load_weights.resolve(load_weights.DEFAULT)  # converted once, outside the measured process
    s = dict(ckpt="smollm2-135m", prune_layers=6, nsamples=4, seqlen=128, steps=2, starts=2, batch_size=1,
             kl_chunk=1024, halving=True, radius=0, device="cpu")
    want = plan.plan_for("search", search.memory_plan, s).rows[0].peak
    got = peak_rss(["search.py", "--ckpt", "smollm2-135m", "--prune-layers", "6", "--nsamples", "4", "--seqlen", "128",
                    "--steps", "2", "--starts", "2", "--radius", "0", "--log-every", "10",
                    "--out", str(tmp_path / "s")])
    assert abs(want - got) / got < 0.2, (want / 2**20, got / 2**20)
    t = dict(ckpt="smollm2-135m", teacher="smollm2-135m", train_layers="12,13", method="full", rank=8, nsamples=4,
             val_samples=2, seqlen=128, batch_size=2, kl_chunk=1024, steps=2, device="cpu")
    want = plan.plan_for("tune", tune.memory_plan, t).rows[0].peak
    got = peak_rss(["tune.py", "--ckpt", "smollm2-135m", "--teacher", "smollm2-135m", "--train-layers", "12,13",
                    "--nsamples", "4", "--val-samples", "2", "--seqlen", "128", "--batch-size", "2", "--steps", "2",
                    "--warmup", "1", "--out", str(tmp_path / "t")])
    assert abs(want - got) / got < 0.2, (want / 2**20, got / 2**20)
