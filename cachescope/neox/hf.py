"""Load a Hugging Face GPT-NeoX checkpoint (e.g. EleutherAI/pythia-*) into ``NeoXModel``.

Reads only files (``config.json`` + safetensors, sharded safetensors, or ``pytorch_model.bin``);
``transformers`` is not needed. Anything the reference model cannot represent is refused with a
``CheckpointError`` that says what was expected.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cachescope.neox.config import NeoXConfig
from cachescope.neox.model import NeoXModel

__all__ = ["CheckpointError", "load_hf_checkpoint", "config_from_hf", "hf_name_map"]

# Tensors HF checkpoints may carry that are buffers, not weights (old GPT-NeoX code saved them).
_IGNORED = re.compile(
    r"^(gpt_neox\.)?(layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)|rotary_emb\.inv_freq)$"
)


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or describes a model the reference NeoX cannot run."""


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> NeoXConfig:
    """Translate an HF ``GPTNeoXConfig`` dict into a ``NeoXConfig``; refuse what is unsupported."""
    model_type = hf.get("model_type")
    if model_type != "gpt_neox":
        raise CheckpointError(f"{source}: model_type is {model_type!r}; only 'gpt_neox' is supported")
    if not hf.get("use_parallel_residual", True):
        raise CheckpointError(
            f"{source}: use_parallel_residual=false is not supported (the reference model only "
            "implements the parallel residual used by Pythia / GPT-NeoX-20B)"
        )
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported; expected 'gelu' (exact GELU)")

    # Rotary settings: older configs use rotary_pct / rotary_emb_base, newer ones rope_parameters.
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    for where, params in (("rope_scaling", scaling), ("rope_parameters", rope)):
        if params:
            kind = params.get("rope_type", params.get("type", "default"))
            if kind not in (None, "default"):
                raise CheckpointError(
                    f"{source}: {where} of type {kind!r} is not supported; only plain (default) rotary is"
                )
    rotary_pct = hf.get("rotary_pct", rope.get("partial_rotary_factor", 0.25))
    rotary_base = hf.get("rotary_emb_base", hf.get("rope_theta", rope.get("rope_theta", 10000.0)))

    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
               if k not in hf]
    if missing:
        raise CheckpointError(f"{source}: missing required field(s) {', '.join(missing)}")
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and heads * int(head_dim) != hidden:
        raise CheckpointError(
            f"{source}: head_dim={head_dim} with {heads} heads does not equal hidden_size={hidden}"
        )
    try:
        return NeoXConfig(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            intermediate_size=int(hf.get("intermediate_size") or 4 * hidden),
            rotary_pct=float(rotary_pct),
            rotary_base=float(rotary_base),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: unsupported configuration: {e}") from e


def hf_name_map(config: NeoXConfig) -> dict[str, str]:
    """HF tensor name -> ``NeoXModel`` parameter name, for every parameter of the model."""
    names = {
        "gpt_neox.embed_in.weight": "embed_in.weight",
        "gpt_neox.final_layer_norm.weight": "final_norm.weight",
        "gpt_neox.final_layer_norm.bias": "final_norm.bias",
        "embed_out.weight": "embed_out.weight",
    }
    per_layer = {
        "input_layernorm": "ln1",
        "post_attention_layernorm": "ln2",
        "attention.query_key_value": "attention.qkv",
        "attention.dense": "attention.dense",
        "mlp.dense_h_to_4h": "mlp.up",
        "mlp.dense_4h_to_h": "mlp.down",
    }
    for i in range(config.num_layers):
        for hf_part, ours in per_layer.items():
            for kind in ("weight", "bias"):
                names[f"gpt_neox.layers.{i}.{hf_part}.{kind}"] = f"layers.{i}.{ours}.{kind}"
    return names


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing {path.name} in {path.parent}: expected {what}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e


def _read_tensors(root: Path) -> dict[str, Tensor]:
    single = root / "model.safetensors"
    index = root / "model.safetensors.index.json"
    legacy = root / "pytorch_model.bin"
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        weight_map = _read_json(index, "a sharded-safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: expected a 'weight_map' object of tensor name -> shard file")
        tensors: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = root / shard
            if not shard_path.is_file():
                raise CheckpointError(f"missing shard {shard} in {root}: listed in {index.name}")
            tensors.update(_load_safetensors(shard_path))
        return tensors
    if legacy.is_file():
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read {legacy}: {e}") from e
        if not isinstance(state, dict):
            raise CheckpointError(f"{legacy}: expected a state dict of tensors")
        return dict(state)
    raise CheckpointError(
        f"no weights in {root}: expected model.safetensors, model.safetensors.index.json "
        "(+ shards) or pytorch_model.bin"
    )


def load_hf_checkpoint(path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> NeoXModel:
    """Build a ``NeoXModel`` from an HF GPT-NeoX checkpoint directory (in eval mode)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist (expected config.json + weights)")
    hf_config = _read_json(root / "config.json", "the HF GPTNeoXConfig")
    config = config_from_hf(hf_config, source=str(root / "config.json"))
    tensors = _read_tensors(root)

    # Accept the in-memory HF name of the readout too, and configurations HF can express but
    # checkpoints omit: tied readout, bias-free attention projections.
    if "embed_out.weight" not in tensors and "lm_head.weight" in tensors:
        tensors["embed_out.weight"] = tensors.pop("lm_head.weight")
    if hf_config.get("tie_word_embeddings", False) and "embed_out.weight" not in tensors:
        if "gpt_neox.embed_in.weight" in tensors:
            tensors["embed_out.weight"] = tensors["gpt_neox.embed_in.weight"]
    if not hf_config.get("attention_bias", True):
        for i in range(config.num_layers):
            for part, width in (("query_key_value", 3 * config.hidden_size), ("dense", config.hidden_size)):
                tensors.setdefault(f"gpt_neox.layers.{i}.attention.{part}.bias", torch.zeros(width))

    name_map = hf_name_map(config)
    missing = [n for n in name_map if n not in tensors]
    unexpected = [n for n in tensors if n not in name_map and not _IGNORED.match(n)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:8])}"
                         + (" ..." if len(unexpected) > 8 else ""))
        raise CheckpointError(f"checkpoint {root} does not match its config.json: " + "; ".join(parts))

    model = NeoXModel(config, init_weights=False)  # parameters on the meta device
    expected_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    state: dict[str, Tensor] = {}
    for hf_name, ours in name_map.items():
        t = tensors[hf_name]
        if tuple(t.shape) != expected_shapes[ours]:
            raise CheckpointError(
                f"tensor {hf_name} has shape {tuple(t.shape)}, expected {expected_shapes[ours]} "
                f"(from config.json)"
            )
        if not t.is_floating_point():
            raise CheckpointError(f"tensor {hf_name} has dtype {t.dtype}; expected a floating-point tensor")
        state[ours] = t.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
