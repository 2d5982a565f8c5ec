"""Tests for loading Hugging Face GPT-NeoX checkpoints into the reference model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from cachescope._cache import Cache
from cachescope.neox import CheckpointError, generate, load_hf_checkpoint, logits_for

transformers = pytest.importorskip("transformers")

PROMPT = [5, 17, 42, 99, 3, 64]


def _random_hf_model() -> Any:
    """A small seeded GPTNeoXForCausalLM whose every parameter (biases, LayerNorms too) is non-trivial."""
    config = transformers.GPTNeoXConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
        rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=256, use_parallel_residual=True,
        hidden_act="gelu", bos_token_id=0, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "layernorm" in name or "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


@pytest.fixture(scope="module")
def hf_model() -> Any:
    return _random_hf_model()


@pytest.fixture(scope="module")
def saved(hf_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("neox") / "single"
    hf_model.save_pretrained(path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(path: Path, fn: Any) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def _hf_logits(hf_model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0]


def test_logits_match_hf(hf_model: Any, saved: Path) -> None:
    """The loaded model's logits equal HF's within 1e-4 for every position."""
    model = load_hf_checkpoint(saved)
    assert torch.allclose(logits_for(model, PROMPT), _hf_logits(hf_model, PROMPT), atol=1e-4, rtol=0)


def test_greedy_tokens_match_hf_generate(hf_model: Any, saved: Path) -> None:
    """Cached and uncached greedy decoding reproduce hf_model.generate token for token."""
    model = load_hf_checkpoint(saved)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                                do_sample=False, pad_token_id=0)
    expected = out[0, len(PROMPT):].tolist()
    assert len(expected) == 20
    assert generate(model, PROMPT, 20, cache=Cache()) == expected
    assert generate(model, PROMPT, 20, cache=Cache(), use_cache=False) == expected


def test_sharded_checkpoint(hf_model: Any, tmp_path: Path) -> None:
    """A sharded safetensors save (index + several shards) loads to the same logits."""
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = load_hf_checkpoint(tmp_path)
    assert torch.allclose(logits_for(model, PROMPT), _hf_logits(hf_model, PROMPT), atol=1e-4, rtol=0)


def test_pytorch_bin_fallback_ignores_buffers(hf_model: Any, saved: Path, tmp_path: Path) -> None:
    """pytorch_model.bin is read when no safetensors exist, and old buffer tensors are ignored."""
    tensors = load_file(str(saved / "model.safetensors"))
    tensors["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    tensors["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    tensors["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    shutil.copy(saved / "config.json", tmp_path / "config.json")
    model = load_hf_checkpoint(tmp_path)
    assert torch.allclose(logits_for(model, PROMPT), _hf_logits(hf_model, PROMPT), atol=1e-4, rtol=0)


def test_legacy_config_fields(hf_model: Any, saved: Path, tmp_path: Path) -> None:
    """Pythia-style rotary_pct / rotary_emb_base fields are read when rope_parameters is absent."""
    path = _copy(saved, tmp_path / "legacy")
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(rotary_pct=0.5, rotary_emb_base=500, rope_scaling=None)
    (path / "config.json").write_text(json.dumps(config))
    model = load_hf_checkpoint(path)
    assert model.config.rotary_pct == 0.5 and model.config.rotary_base == 500.0
    assert model.config.rotary_dim == 8


def test_dtype_argument(saved: Path) -> None:
    """dtype converts every parameter."""
    model = load_hf_checkpoint(saved, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert len(generate(model, PROMPT, 3, cache=Cache())) == 3


def test_missing_directory(tmp_path: Path) -> None:
    """A directory that does not exist is a CheckpointError naming it."""
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nowhere")


def test_missing_config(saved: Path, tmp_path: Path) -> None:
    """A missing config.json is a CheckpointError naming the file."""
    path = _copy(saved, tmp_path / "c")
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_checkpoint(path)


def test_missing_weights(saved: Path, tmp_path: Path) -> None:
    """A directory without any weight file is a CheckpointError listing the accepted files."""
    path = _copy(saved, tmp_path / "w")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors.*pytorch_model.bin"):
        load_hf_checkpoint(path)


def test_missing_shard(hf_model: Any, tmp_path: Path) -> None:
    """A shard listed in the index but absent is a CheckpointError naming the shard."""
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_parallel_residual": False}, "use_parallel_residual"),
        ({"model_type": "llama"}, "model_type"),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "linear"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "dynamic"),
    ],
)
def test_unsupported_config(saved: Path, tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    """Configurations the reference model cannot run are refused with a CheckpointError."""
    path = _copy(saved, tmp_path / "cfg")
    _edit_config(path, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_hf_checkpoint(path)


def test_missing_tensor(saved: Path, tmp_path: Path) -> None:
    """A missing weight is a CheckpointError naming it."""
    path = _copy(saved, tmp_path / "m")
    _edit_tensors(path, lambda t: t.pop("gpt_neox.layers.1.mlp.dense_h_to_4h.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*gpt_neox\.layers\.1\.mlp\.dense_h_to_4h\.bias"):
        load_hf_checkpoint(path)


def test_unexpected_tensor(saved: Path, tmp_path: Path) -> None:
    """A tensor the model has no place for is a CheckpointError naming it."""
    path = _copy(saved, tmp_path / "u")
    _edit_tensors(path, lambda t: t.update({"gpt_neox.layers.9.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*layers\.9\.mlp\.extra\.weight"):
        load_hf_checkpoint(path)


def test_shape_mismatch(saved: Path, tmp_path: Path) -> None:
    """A tensor of the wrong shape is a CheckpointError naming it with expected and actual shapes."""
    path = _copy(saved, tmp_path / "s")

    def shrink(tensors: dict[str, torch.Tensor]) -> None:
        name = "gpt_neox.layers.2.attention.dense.weight"
        tensors[name] = tensors[name][:, :32].contiguous()

    _edit_tensors(path, shrink)
    with pytest.raises(CheckpointError, match=r"attention\.dense\.weight has shape \(64, 32\), expected \(64, 64\)"):
        load_hf_checkpoint(path)


def test_config_size_mismatch(saved: Path, tmp_path: Path) -> None:
    """A config.json that disagrees with the tensors (intermediate_size) reports the shape mismatch."""
    path = _copy(saved, tmp_path / "i")
    _edit_config(path, intermediate_size=100)
    with pytest.raises(CheckpointError, match=r"dense_h_to_4h\.(weight|bias) has shape"):
        load_hf_checkpoint(path)


def test_a_pipeline_stage_reads_only_its_own_tensors(tmp_path, monkeypatch):
    """ParallelNeoX.from_hf_checkpoint on the last of two pipeline stages: the tensors it reads
    are its layer's and the readout's, never stage 0's; its weights equal the full model's.
    (TP slicing of the same loader is tested on real ranks in test_parallel_model.)"""
    import torch

    from cachescope.neox import hf
    from cachescope.neox.parallel import ParallelLayout, ParallelNeoX
    from _helpers import save_tiny_neox_checkpoint

    path = save_tiny_neox_checkpoint(tmp_path / "ckpt")      # 3 layers: stage 1 holds layer 2
    read: list[str] = []
    load = hf._Lazy.load
    monkeypatch.setattr(hf._Lazy, "load", lambda self: (read.append(self.name), load(self))[1])
    layout = ParallelLayout(tp=1, pp=2, rank=1)
    shard = ParallelNeoX.from_hf_checkpoint(path, layout)
    assert list(shard.layer_range) == [2]
    assert read and all(n.startswith("gpt_neox.layers.2.") or n in (
        "gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "embed_out.weight")
        for n in read), read
    assert len(read) == len(set(read))          # each tensor read once
    full = hf.load_hf_checkpoint(path)
    assert torch.equal(shard.layers[0].attention.qkv.weight, full.layers[2].attention.qkv.weight)
    assert torch.equal(shard.layers[0].mlp.down.weight, full.layers[2].mlp.down.weight)
    assert torch.equal(shard.embed_out.weight, full.embed_out.weight)
    assert shard.embed_in is None


def test_lazy_state_dict_checks_like_the_eager_one(tmp_path):
    from cachescope.neox import hf
    from _helpers import save_tiny_neox_checkpoint

    path = save_tiny_neox_checkpoint(tmp_path / "ckpt")
    config, eager = hf.hf_state_dict(path)
    config2, lazy = hf.hf_state_dict(path, lazy=True)
    assert config == config2 and sorted(eager) == sorted(lazy)
    import torch
    assert all(torch.equal(eager[k], lazy[k]) for k in eager)
