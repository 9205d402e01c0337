"""Checkpoint loading and writing: round trips, name resolution, and clear errors on bad input."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import load_weights as lw
import save_weights
from conftest import FIXTURES
from machinery.errors import UserError
from model import hf_state_dict


def copy_fixture(tmp_path, name="tiny-llama3"):
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    return d


def listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_sharded_round_trip_gives_the_same_logits(tmp_path, tiny_dir):
    model, _ = lw.load(tiny_dir)
    cfg = lw.read_config_dict(tiny_dir)
    out = save_weights.save_checkpoint(tmp_path / "out", cfg, hf_state_dict(model), source_dir=tiny_dir, max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert ("lm_head.weight" in index["weight_map"]) == (not cfg.get("tie_word_embeddings", False))
    assert (out / "generation_config.json").is_file()
    again, _ = lw.load(out)
    ids = load_file(tiny_dir / "reference.safetensors")["input_ids"]
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp directories left behind


def test_save_is_atomic_when_writing_fails(tmp_path):
    model, _ = lw.load(FIXTURES / "tiny-qwen2")
    out = tmp_path / "ckpt"
    save_weights.save_checkpoint(out, {"first": 1}, {"a": torch.zeros(2)})
    before = listing(out)
    # a non-tensor value makes safetensors fail half-way: the old directory must survive untouched
    with pytest.raises(Exception):
        save_weights.save_checkpoint(out, {"second": 2}, {"a": torch.zeros(2), "b": "not a tensor"})
    assert listing(out) == before and json.loads((out / "config.json").read_text()) == {"first": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        lw.load(tmp_path)


def test_missing_shard_names_the_file(tmp_path):
    model, _ = lw.load(FIXTURES / "tiny-llama2")
    out = save_weights.save_checkpoint(tmp_path / "s", lw.read_config_dict(FIXTURES / "tiny-llama2"), hf_state_dict(model),
                             max_shard_bytes=100_000)
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        lw.load(out)


def test_wrong_shape_names_the_tensor(tmp_path):
    d = copy_fixture(tmp_path)
    t = load_file(d / "model.safetensors")
    t["model.layers.3.mlp.up_proj.weight"] = t["model.layers.3.mlp.up_proj.weight"][:-1]
    save_file(t, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.up_proj\.weight.*\(175, 64\)"):
        lw.load(d)


def test_missing_and_unexpected_tensors_are_errors(tmp_path):
    d = copy_fixture(tmp_path)
    t = load_file(d / "model.safetensors")
    t["model.layers.9.mlp.up_proj.weight"] = t.pop("model.layers.5.mlp.up_proj.weight")
    save_file(t, d / "model.safetensors")
    with pytest.raises(UserError, match=r"unexpected tensor 'model\.layers\.9"):
        lw.load(d)
    del t["model.layers.9.mlp.up_proj.weight"]
    save_file(t, d / "model.safetensors")
    with pytest.raises(UserError, match=r"missing tensor 'model\.layers\.5\.mlp\.up_proj\.weight'"):
        lw.load(d)


def test_unknown_architecture_and_bad_config(tmp_path):
    d = copy_fixture(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match="model_type 'gpt_neox' is not supported"):
        lw.load(d)
    (d / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(ValueError, match="yarn"):
        lw.load(d)
    (d / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        lw.load(d)
    before = listing(d)
    assert listing(d) == before  # loading never writes


def test_unknown_name_lists_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("CLP_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError) as e:
        lw.resolve("llama2-7b")
    msg = str(e.value)
    assert "meta-llama/Llama-2-7b-hf" in msg and str(tmp_path / "models") in msg and str(tmp_path / "hf") in msg
    assert "huggingface-cli download meta-llama/Llama-2-7b-hf" in msg
    with pytest.raises(FileNotFoundError, match="known name"):
        lw.resolve("no-such-model")
    assert not (tmp_path / "models").exists() and not (tmp_path / "hf").exists()


def test_names_resolve_through_models_dir_and_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snap = tmp_path / "hf" / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / "abc123"
    shutil.copytree(FIXTURES / "tiny-qwen2", snap)
    monkeypatch.delenv("CLP_MODELS", raising=False)
    assert lw.resolve("qwen2.5-0.5b") == snap
    assert lw.resolve("Qwen/Qwen2.5-0.5B") == snap
    monkeypatch.setenv("CLP_MODELS", str(tmp_path / "models"))
    shutil.copytree(FIXTURES / "tiny-llama2", tmp_path / "models" / "Llama-2-7b-hf")
    assert lw.resolve("llama2-7b") == tmp_path / "models" / "Llama-2-7b-hf"


def test_loading_does_not_hold_two_copies_of_the_weights(tmp_path):
    import subprocess
    import sys

    from model import Config, Transformer

    cfg = Config("llama", vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=8)
    raw = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1536,
           "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8}
    out = save_weights.save_checkpoint(tmp_path / "ckpt", raw, hf_state_dict(Transformer(cfg)))
    size = (out / "model.safetensors").stat().st_size
    probe = ("import resource, sys, torch, load_weights as lw\n"
             "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "model, _ = lw.load(sys.argv[1])\n"
             "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n")
    r = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True, cwd=lw.Path(lw.__file__).parent)
    assert r.returncode == 0, r.stderr
    grew = int(r.stdout.strip())
    assert size > 200e6 and grew < 1.15 * size, f"peak RSS grew by {grew / 1e6:.0f} MB for {size / 1e6:.0f} MB of weights"


def test_written_checkpoint_has_normal_permissions(tmp_path):
    import os

    out = save_weights.save_checkpoint(tmp_path / "c", {"a": 1}, {"x": torch.zeros(3)})
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask
    assert all((f.stat().st_mode & 0o777) == 0o666 & ~umask for f in out.iterdir())


def test_decode_layout_stores_multiplying_weights_column_major_with_the_same_values():
    from safetensors.torch import load_file

    d = FIXTURES / "tiny-llama3"
    model = lw.decode_layout(lw.load(d)[0])
    files = {}
    for f in sorted(d.glob("*.safetensors")):
        files.update(load_file(f))
    q = model.layers[0].self_attn.q_proj.weight
    assert q.t().is_contiguous() and not q.is_contiguous()  # the decode layout (load_weights.decode_layout)
    assert torch.equal(q, files["model.layers.0.self_attn.q_proj.weight"])
    assert model.layers[0].input_layernorm.weight.is_contiguous()
