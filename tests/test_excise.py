"""Excision: keep = 0 on a block equals the excised checkpoint after a save/load round trip; bad input is refused."""
import json

import pytest
import torch
from safetensors import safe_open

import excise
import load_weights
import save_weights
import search
from conftest import FIXTURES
from model import hf_state_dict


def reference_ids(tiny_dir):
    with safe_open(tiny_dir / "reference.safetensors", "pt") as f:
        return f.get_tensor("input_ids")


@pytest.mark.parametrize("removed", [[2, 3], [0], [5], [1, 2, 3, 4]])
def test_keep_zero_equals_excised_checkpoint(tiny_dir, tmp_path, removed):
    model, _ = load_weights.load(tiny_dir)
    ids = reference_ids(tiny_dir)
    keep = torch.ones(model.cfg.num_layers)
    keep[removed] = 0
    want = model(ids, keep=keep)
    out = tmp_path / "pruned"
    save_weights.write_pruned(model, tiny_dir, removed, out)
    small, _ = load_weights.load(out)
    assert small.cfg.num_layers == 6 - len(removed)
    torch.testing.assert_close(small(ids), want, atol=1e-5, rtol=0)
    # and the cut really changed the model (the test could not pass with an unpruned copy)
    assert (model(ids) - want).abs().max() > 1e-3


def test_checkpoint_contents(tiny_dir, tmp_path):
    model, _ = load_weights.load(tiny_dir)
    out = tmp_path / "pruned"
    save_weights.write_pruned(model, tiny_dir, [1, 2], out, {"method": "test"})
    src, cfg = load_weights.read_config_dict(tiny_dir), load_weights.read_config_dict(out)
    assert cfg["num_hidden_layers"] == 4
    assert {k: v for k, v in cfg.items() if k not in ("num_hidden_layers", "layer_types")} == \
           {k: v for k, v in src.items() if k not in ("num_hidden_layers", "layer_types")}
    if "layer_types" in src:
        assert len(cfg["layer_types"]) == 4
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        # renumbered: source layer 3 is now layer 1
        with safe_open(tiny_dir / "model.safetensors", "pt") as g:
            torch.testing.assert_close(f.get_tensor("model.layers.1.mlp.up_proj.weight"),
                                       g.get_tensor("model.layers.3.mlp.up_proj.weight"), atol=0, rtol=0)
            assert f.get_tensor("model.norm.weight").dtype == g.get_tensor("model.norm.weight").dtype
    assert not any(n.startswith("model.layers.4.") for n in names)
    assert ("lm_head.weight" in names) == (not src.get("tie_word_embeddings", False))
    assert (out / "generation_config.json").read_text() == (tiny_dir / "generation_config.json").read_text()
    pruning = json.loads((out / "pruning.json").read_text())
    assert pruning["removed_layers"] == [1, 2] and pruning["kept_layers"] == [0, 3, 4, 5]
    assert pruning["source_num_layers"] == 6 and pruning["method"] == "test"


def test_parse_layers():
    assert excise.parse_layers("17-22", 30) == [17, 18, 19, 20, 21, 22]
    assert excise.parse_layers("3,5, 10-11", 30) == [3, 5, 10, 11]
    for bad, msg in [("28-30", "unknown layer"), ("5-3", "backwards"), ("x", "cannot read"), ("", "cannot read"),
                     ("1,1", "twice"), ("0-29", "one kept"), ("-1", "cannot read")]:
        with pytest.raises(ValueError, match=msg):
            excise.parse_layers(bad, 30)


def test_report_from_another_model_is_refused(tmp_path):
    llama2, llama3 = FIXTURES / "tiny-llama2", FIXTURES / "tiny-llama3"
    search.main(["--ckpt", str(llama2), "--prune-layers", "2", "--steps", "3", "--starts", "1", "--nsamples", "2",
                 "--seqlen", "16", "--out", str(tmp_path / "s")])
    report = tmp_path / "s" / "report.json"
    # the same report cuts its own model
    pruning = excise.run(llama2, tmp_path / "ok", search_report=report)
    assert pruning["method"] == "clp-gate" and pruning["removed_layers"] == json.loads(report.read_text())["removed_layers"]
    with pytest.raises(ValueError, match="another model"):
        excise.run(llama3, tmp_path / "bad", search_report=report)
    assert not (tmp_path / "bad").exists()


def test_cli_errors(tmp_path, capsys):
    from conftest import FIXTURES
    ckpt = str(FIXTURES / "tiny-llama2")
    for argv, msg in [(["--out", str(tmp_path / "o")], "exactly one of"),
                      (["--layers", "6", "--out", str(tmp_path / "o")], "unknown layer"),
                      (["--layers", "0-5", "--out", str(tmp_path / "o")], "one kept")]:
        with pytest.raises(SystemExit):
            excise.main(["--ckpt", ckpt] + argv)
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bf16_source_stays_bf16(tmp_path):
    from conftest import FIXTURES
    src = FIXTURES / "tiny-qwen2"
    model, _ = load_weights.load(src, dtype=torch.bfloat16)
    config = dict(load_weights.read_config_dict(src), torch_dtype="bfloat16")
    save_weights.save_checkpoint(tmp_path / "bf16", config, hf_state_dict(model), source_dir=src)
    excise.main(["--ckpt", str(tmp_path / "bf16"), "--layers", "4-5", "--out", str(tmp_path / "cut")])
    with safe_open(tmp_path / "cut" / "model.safetensors", "pt") as f:
        t = f.get_tensor("model.layers.3.self_attn.q_proj.bias")
    assert t.dtype == torch.bfloat16
    torch.testing.assert_close(t, model.layers[3].self_attn.q_proj.bias, atol=0, rtol=0)


def test_search_in_bf16_still_writes_the_stored_fp32_weights(tmp_path):
    from conftest import FIXTURES
    src = FIXTURES / "tiny-llama2"
    model, _ = load_weights.load(src, dtype=torch.bfloat16)
    assert load_weights.unrounded(model, src) is not model  # rounded below the stored fp32: loaded again
    fp32 = load_weights.load(src)[0]
    assert load_weights.unrounded(fp32, src) is fp32
    save_weights.write_pruned(load_weights.unrounded(model, src), src, [0], tmp_path / "cut")  # as search.py --excise
    with safe_open(tmp_path / "cut" / "model.safetensors", "pt") as f, safe_open(src / "model.safetensors", "pt") as g:
        torch.testing.assert_close(f.get_tensor("model.layers.0.self_attn.q_proj.weight"),
                                   g.get_tensor("model.layers.1.self_attn.q_proj.weight"), atol=0, rtol=0)
