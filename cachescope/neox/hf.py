"""Load a Hugging Face GPT-NeoX checkpoint (e.g. EleutherAI/pythia-*) into ``NeoXModel``.

Reads only files (``config.json`` + safetensors, sharded safetensors, or ``pytorch_model.bin``);
``transformers`` is not needed. Anything the reference model cannot represent is refused with a
``CheckpointError`` that says what was expected.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cachescope.neox.config import NeoXConfig
from cachescope.neox.model import NeoXModel

__all__ = ["CheckpointError", "load_hf_checkpoint", "hf_state_dict", "config_from_hf", "hf_name_map"]

# Tensors HF checkpoints may carry that are buffers, not weights (old GPT-NeoX code saved them).
_IGNORED = re.compile(
    r"^(gpt_neox\.)?(layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)|rotary_emb\.inv_freq)$"
)
_LAYER = re.compile(r"^gpt_neox\.layers\.(\d{1,9})\.")


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or describes a model the reference NeoX cannot run."""


_UNSET: Any = object()


def _shown(value: Any) -> str:
    """``value`` as a message shows it: its JSON spelling (cut short) and its JSON type."""
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "an object"}
    if value is None:
        return "null"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    if len(text) > 60:
        text = text[:57] + "..."
    kind = kinds.get(type(value))
    return f"{text} ({kind})" if kind else text


class _Fields:
    """Typed reads of one config dict; every wrong value is a one-line ``CheckpointError`` that
    names the field, the value found and what was expected."""

    def __init__(self, data: dict[str, Any], source: str, prefix: str = "") -> None:
        self.data, self.source, self.prefix = data, source, prefix

    def fail(self, key: str, expected: str, default: Any = _UNSET) -> CheckpointError:
        fix = ("correct it" if default is _UNSET else "correct it, or remove the field"
               + ("" if default is None else f" to use the default, {json.dumps(default)}"))
        return CheckpointError(f"{self.source}: {self.prefix}{key} must be {expected}, found "
                               f"{_shown(self.data[key])}; {fix}")

    def get(self, key: str) -> Any:
        """The raw value, or ``_UNSET`` when the field is absent or null (HF writes null for
        "not set")."""
        value = self.data.get(key)
        return _UNSET if value is None else value

    def integer(self, key: str, default: Any = _UNSET, *, what: str = "a positive integer") -> Any:
        """A positive int (an integral JSON number such as 64.0 is read as 64)."""
        value = self.get(key)
        if value is _UNSET:
            if default is _UNSET:   # a required field (checked present): null
                raise self.fail(key, what)
            return default
        if type(value) is float and value.is_integer():
            value = int(value)
        if type(value) is not int or value <= 0:
            raise self.fail(key, what, default)
        if value >= 1 << 63:   # no tensor dimension is this large; torch sizes are int64
            raise self.fail(key, what + " below 2**63", default)
        return value

    def number(self, key: str, default: Any, *, what: str, low: float = 0.0,
               low_inclusive: bool = False, high: float = math.inf) -> Any:
        """A finite JSON number (int or float, not a boolean) in the given range, as a float."""
        value = self.get(key)
        if value is _UNSET:
            return default
        try:
            number = float(value) if type(value) in (int, float) else math.nan
        except OverflowError:   # an integer beyond any float
            number = math.nan
        if not math.isfinite(number) or not (number >= low if low_inclusive else number > low) \
                or number > high:
            raise self.fail(key, what, default)
        return number

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is _UNSET:
            return default
        if type(value) is not bool:
            raise self.fail(key, "true or false", default)
        return value

    def obj(self, key: str) -> dict[str, Any] | None:
        """A JSON object, or None when the field is absent or null."""
        value = self.get(key)
        if value is _UNSET:
            return None
        if type(value) is not dict:
            raise self.fail(key, "an object (or null)")
        return value


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> NeoXConfig:
    """Translate an HF ``GPTNeoXConfig`` dict into a ``NeoXConfig``; refuse what is unsupported.

    Every field read is checked: sizes must be positive integers (an integral number such as
    64.0 is taken as 64; 64.7 is refused), rotary settings and epsilons finite numbers in range,
    flags booleans, rope settings objects. Null counts as "not set" except for the required
    sizes. Anything else is a ``CheckpointError`` naming the field, the value and what was
    expected."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source}: expected a JSON object, found {_shown(hf)}")
    f = _Fields(hf, source)
    model_type = hf.get("model_type")
    if model_type != "gpt_neox":
        raise CheckpointError(f"{source}: model_type is {_shown(model_type)}; only \"gpt_neox\" "
                              "is supported")
    if not f.boolean("use_parallel_residual", True):
        raise CheckpointError(
            f"{source}: use_parallel_residual=false is not supported (the reference model only "
            "implements the parallel residual used by Pythia / GPT-NeoX-20B)"
        )
    act = f.get("hidden_act")
    if act is not _UNSET and act != "gelu":
        raise CheckpointError(f"{source}: hidden_act {_shown(act)} is not supported; expected "
                              "\"gelu\" (exact GELU)")
    f.boolean("tie_word_embeddings", False)     # read by load_hf_checkpoint
    f.boolean("attention_bias", True)

    # Rotary settings: older configs use rotary_pct / rotary_emb_base, newer ones rope_parameters.
    rope = f.obj("rope_parameters") or {}
    scaling = f.obj("rope_scaling")
    for where, params in (("rope_scaling", scaling), ("rope_parameters", rope)):
        if params:
            kind = params.get("rope_type", params.get("type", "default"))
            if kind not in (None, "default"):
                raise CheckpointError(
                    f"{source}: {where} of type {_shown(kind)} is not supported; only plain "
                    "(default) rotary is"
                )
    r = _Fields(rope, source, "rope_parameters.")
    pct_what = "a number in [0, 1] (the share of each head's dims that are rotated)"
    rotary_pct = f.number("rotary_pct", _UNSET, what=pct_what, low_inclusive=True, high=1.0)
    if rotary_pct is _UNSET:
        rotary_pct = r.number("partial_rotary_factor", 0.25, what=pct_what, low_inclusive=True,
                              high=1.0)
    base_what = "a positive number (the rotary theta)"
    rotary_base = f.number("rotary_emb_base", _UNSET, what=base_what)
    if rotary_base is _UNSET:
        rotary_base = f.number("rope_theta", _UNSET, what=base_what)
    if rotary_base is _UNSET:
        rotary_base = r.number("rope_theta", 10000.0, what=base_what)

    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
               if k not in hf]
    if missing:
        raise CheckpointError(f"{source}: missing required field(s) {', '.join(missing)}")
    vocab = f.integer("vocab_size")
    hidden = f.integer("hidden_size")
    layers = f.integer("num_hidden_layers")
    heads = f.integer("num_attention_heads")
    head_dim = f.integer("head_dim", None)
    if head_dim is not None and heads * head_dim != hidden:
        raise CheckpointError(
            f"{source}: head_dim={head_dim} with {heads} heads does not equal hidden_size={hidden}"
        )
    intermediate = f.integer("intermediate_size", 4 * hidden)
    max_positions = f.integer("max_position_embeddings", 2048)
    eps = f.number("layer_norm_eps", 1e-5, what="a positive number (the LayerNorm epsilon)")
    try:
        return NeoXConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            intermediate_size=intermediate,
            rotary_pct=rotary_pct,
            rotary_base=rotary_base,
            max_position_embeddings=max_positions,
            layer_norm_eps=eps,
        )
    except (ValueError, OverflowError) as e:
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
    except (OSError, ValueError) as e:   # ValueError: not JSON, not UTF-8, a 5000-digit number
        raise CheckpointError(f"cannot read {path}: {e}") from e
    except RecursionError:
        raise CheckpointError(f"cannot read {path}: it nests arrays/objects too deep to parse; "
                              f"expected {what}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object ({what}), found {_shown(data)}")
    return data


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


class _Lazy:
    """A tensor of a safetensors file, known by its header (shape, dtype) and read only when
    ``load()`` is called: a rank that needs a few layers of a checkpoint reads those only."""

    __slots__ = ("path", "name", "shape", "_dtype")

    def __init__(self, path: Path, name: str, shape: list[int], dtype: str) -> None:
        self.path, self.name, self.shape, self._dtype = path, name, torch.Size(shape), dtype

    def dim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return self._dtype in _FLOAT_DTYPES

    def load(self) -> Tensor:
        from safetensors import safe_open
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                return f.get_tensor(self.name)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read tensor {self.name} of {self.path}: {e}") from e


def _load_safetensors(path: Path, lazy: bool = False) -> dict[str, Any]:
    try:
        if lazy:
            from safetensors import safe_open
            with safe_open(str(path), framework="pt", device="cpu") as f:
                out: dict[str, Any] = {}
                for name in f.keys():
                    sl = f.get_slice(name)
                    out[name] = _Lazy(path, name, list(sl.get_shape()), str(sl.get_dtype()))
                return out
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e


def _read_tensors(root: Path, lazy: bool = False) -> dict[str, Any]:
    single = root / "model.safetensors"
    index = root / "model.safetensors.index.json"
    legacy = root / "pytorch_model.bin"
    if single.is_file():
        return _load_safetensors(single, lazy)
    if index.is_file():
        weight_map = _read_json(index, "a sharded-safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(
                type(v) is str for v in weight_map.values()):
            raise CheckpointError(f"{index}: expected a 'weight_map' object of tensor name -> shard file")
        tensors: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = root / shard
            if not shard_path.is_file():
                raise CheckpointError(f"missing shard {shard} in {root}: listed in {index.name}")
            tensors.update(_load_safetensors(shard_path, lazy))
        return tensors
    if legacy.is_file():
        try:
            try:   # mmap: storages are paged in only where they are read (a rank's slices)
                state = torch.load(legacy, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:   # a legacy (pre-zipfile) file cannot be mapped
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


class _LazyState(dict):
    """``NeoXModel`` parameter name -> tensor, each read from its file (and converted) when it is
    looked up; nothing is kept."""

    def __init__(self, items: dict[str, Any], device: Any, dtype: torch.dtype) -> None:
        super().__init__(items)
        self._device, self._dtype = device, dtype

    def __getitem__(self, name: str) -> Tensor:
        t = super().__getitem__(name)
        if isinstance(t, _Lazy):
            t = t.load()
        return t.to(device=self._device, dtype=self._dtype)


def hf_state_dict(path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu",
                  lazy: bool = False) -> tuple[NeoXConfig, dict[str, Tensor]]:
    """The config and the ``NeoXModel`` state dict of an HF GPT-NeoX checkpoint directory,
    checked against each other (names, shapes, dtypes) from the files' headers.

    With ``lazy``, tensors of safetensors files are read only when looked up (each lookup reads
    the file again: look each up once), and ``pytorch_model.bin`` is memory-mapped: a rank of a
    pipeline/tensor-parallel run reads its own layers only (``ParallelNeoX.from_hf_checkpoint``).
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist (expected config.json + weights)")
    source = str(root / "config.json")
    hf_config = _read_json(root / "config.json", "the HF GPTNeoXConfig")
    config = config_from_hf(hf_config, source=source)
    fields = _Fields(hf_config, source)
    tensors = _read_tensors(root, lazy)

    # Before anything loops over layers: the config cannot ask for more than the weights hold.
    held = {int(m.group(1)) for m in map(_LAYER.match, tensors) if m is not None}
    top = max(held) + 1 if held else 0
    if config.num_layers > top:
        raise CheckpointError(
            f"checkpoint {root} does not match its config.json: num_hidden_layers is "
            f"{config.num_layers} but the weights hold "
            + (f"layers 0..{top - 1} only" if top else
               "no gpt_neox.layers.N.* tensor (expected names like "
               "gpt_neox.layers.0.attention.query_key_value.weight)")
            + "; correct num_hidden_layers or use the matching weights")

    # Accept the in-memory HF name of the readout too, and configurations HF can express but
    # checkpoints omit: tied readout, bias-free attention projections.
    if "embed_out.weight" not in tensors and "lm_head.weight" in tensors:
        tensors["embed_out.weight"] = tensors.pop("lm_head.weight")
    if fields.boolean("tie_word_embeddings", False) and "embed_out.weight" not in tensors:
        if "gpt_neox.embed_in.weight" in tensors:
            tensors["embed_out.weight"] = tensors["gpt_neox.embed_in.weight"]
    if not fields.boolean("attention_bias", True):
        for i in range(config.num_layers):
            for part in ("query_key_value", "dense"):
                weight = tensors.get(f"gpt_neox.layers.{i}.attention.{part}.weight")
                if weight is not None and weight.dim() >= 1:   # else the checks below name it
                    tensors.setdefault(f"gpt_neox.layers.{i}.attention.{part}.bias",
                                       torch.zeros(weight.shape[0]))

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

    try:
        model = NeoXModel(config, init_weights=False)  # parameters on the meta device
    except (RuntimeError, ValueError, OverflowError, MemoryError) as e:
        raise CheckpointError(f"{source} describes a model that cannot be built ({e}); correct "
                              "its sizes") from e
    expected_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    state: dict[str, Any] = {}
    for hf_name, ours in name_map.items():
        t = tensors[hf_name]
        if tuple(t.shape) != expected_shapes[ours]:
            raise CheckpointError(
                f"tensor {hf_name} has shape {tuple(t.shape)}, expected {expected_shapes[ours]} "
                f"(from config.json)"
            )
        if not t.is_floating_point():
            shown = getattr(t, "dtype", None) or getattr(t, "_dtype", "?")
            raise CheckpointError(f"tensor {hf_name} has dtype {shown}; expected a floating-point tensor")
        state[ours] = t if lazy else t.to(device=device, dtype=dtype)
    if lazy:
        return config, _LazyState(state, device, dtype)
    return config, state


def load_hf_checkpoint(path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> NeoXModel:
    """Build a ``NeoXModel`` from an HF GPT-NeoX checkpoint directory (in eval mode)."""
    config, state = hf_state_dict(path, dtype=dtype, device=device)
    model = NeoXModel(config, init_weights=False)  # parameters on the meta device
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
