"""plots.py on the reports of a fixture search: the masks it recomputes, the PNGs it writes, and life without matplotlib."""
import sys

import pytest
import torch

import baselines
import excise
import plots
import search
import tune
from conftest import FIXTURES, need


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A gate search, an exhaustive baseline and a short tuning run on tiny-llama3 (6 layers, random-id calibration)."""
    src, tmp = need(FIXTURES / "tiny-llama3"), tmp_path_factory.mktemp("runs")
    small = dict(prune_layers=2, nsamples=2, seqlen=16)
    search.run(src, tmp / "search", steps=6, starts=2, log_every=100, **small)
    baselines.run(src, "exhaustive", tmp / "exhaustive", **small)
    excise.run(src, tmp / "pruned", search_report=tmp / "search" / "report.json")
    tune.run(tmp / "pruned", tmp / "tuned", steps=4, batch_size=1, nsamples=2, val_samples=1, seqlen=16, log_every=100)
    return tmp


def test_masks_follow_the_trajectory(runs):
    report = plots.read_json(runs / "search" / "report.json", "report")
    masks = plots.gate_masks(report)
    assert sorted(masks) == [0, 1] and all(m.shape == (6, 6) for m in masks.values())
    (survivor,) = report["trajectory"][-1]["mu"]  # one start left after halving
    assert masks[int(survivor)][-1].sum() == pytest.approx(2, abs=0.2)  # tau 0.05: the window holds k = 2 layers
    stopped = [m for m in masks.values() if m[-1].isnan().all()]
    assert len(stopped) == 1  # successive halving stopped one of the two starts
    first = report["trajectory"][0]
    gate = plots.ContiguousGate(6, 2, 1, first["mu"]["0"])
    assert torch.allclose(masks[0][0], 1 - gate.keep(first["tau"]))


def test_block_kls_of_both_report_kinds(runs):
    exh = plots.block_kls(plots.read_json(runs / "exhaustive" / "report.json", "report"))
    assert [s for s, _ in exh] == [0, 1, 2, 3, 4]
    gate = dict(plots.block_kls(plots.read_json(runs / "search" / "report.json", "report")))
    assert all(kl == pytest.approx(dict(exh)[s], rel=1e-5) for s, kl in gate.items())  # same cached teacher


def test_pictures_are_written(runs, capsys):
    pytest.importorskip("matplotlib")
    plots.main(["--search-report", str(runs / "search" / "report.json"), "--exhaustive", str(runs / "exhaustive" / "report.json"),
                "--tuning", str(runs / "tuned"), "--out", str(runs / "pics")])
    for name in ("gate.png", "landscape.png", "tuning.png"):
        png = (runs / "pics" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000, name
    assert capsys.readouterr().out.count("wrote ") == 3


def test_without_matplotlib_one_line_and_a_clean_exit(runs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert plots.main(["--search-report", str(runs / "search" / "report.json"), "--out", str(runs / "none")]) is None
    assert capsys.readouterr().out.strip() == plots.HOW
    assert not (runs / "none").exists()


def test_bad_input_is_one_clear_error(runs, capsys):
    with pytest.raises(SystemExit):
        plots.main(["--search-report", str(runs / "missing.json")])
    err = capsys.readouterr().err.strip()
    assert err.startswith("plots.py: error:") and "missing.json" in err and len(err.splitlines()) == 1
    with pytest.raises(ValueError, match="trajectory"):
        plots.gate_masks(plots.read_json(runs / "exhaustive" / "report.json", "report"))
