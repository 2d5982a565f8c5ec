"""Configuration of the reference GPT-NeoX model, with named presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["NeoXConfig", "PRESETS"]


@dataclass(frozen=True)
class NeoXConfig:
    """Shape and numerics of a GPT-NeoX model. The defaults are the ``tiny`` preset.

    Frozen so the shared ``PRESETS`` entries cannot be changed by accident;
    derive variants with ``NeoXConfig.preset(name, **overrides)`` or ``dataclasses.replace``.
    """

    vocab_size: int = 512  # number of token ids; rows of embed_in / embed_out
    hidden_size: int = 64  # width of the residual stream (d_model)
    num_layers: int = 4  # number of transformer layers
    num_heads: int = 4  # attention heads per layer; must divide hidden_size
    intermediate_size: int | None = None  # MLP inner width; None means 4 * hidden_size
    rotary_pct: float = 0.25  # fraction of each head's dims that get rotary embeddings
    rotary_base: float = 10000.0  # theta of the rotary frequencies
    max_position_embeddings: int = 2048  # longest sequence (prompt + generated) a forward accepts
    layer_norm_eps: float = 1e-5  # epsilon of every LayerNorm
    use_parallel_residual: bool = True  # x + attn(ln1(x)) + mlp(ln2(x)); only True is supported
    seed: int = 0  # seed of the torch.Generator that draws the random initial weights

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
        if type(self.use_parallel_residual) is not bool:
            raise ValueError(f"use_parallel_residual must be a bool, got {self.use_parallel_residual!r}")
        if not self.use_parallel_residual:
            raise ValueError(
                "use_parallel_residual=False is not supported: the reference model only implements "
                "the parallel residual x + attn(ln1(x)) + mlp(ln2(x))"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("rotary_pct", "rotary_base", "layer_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct must be in [0, 1], got {self.rotary_pct}")
        if self.rotary_dim % 2 != 0:
            raise ValueError(
                f"rotary dims per head (int(head_dim * rotary_pct) = {self.rotary_dim}) must be even"
            )
        if self.rotary_base <= 0:
            raise ValueError(f"rotary_base must be positive, got {self.rotary_base}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head are rotated (HF: ``int(head_dim * rotary_pct)``)."""
        return int(self.head_dim * self.rotary_pct)

    @classmethod
    def preset(cls, name: str = "tiny", **overrides: Any) -> NeoXConfig:
        """A copy of the named preset, with ``overrides`` applied (e.g. ``seed=1``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown NeoX preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, NeoXConfig] = {
    # Fast on CPU; the default for tests and demos.
    "tiny": NeoXConfig(),
    # Shapes of EleutherAI/pythia-70m (random weights unless loaded from a checkpoint).
    "pythia-70m": NeoXConfig(vocab_size=50304, hidden_size=512, num_layers=6, num_heads=8,
                             intermediate_size=2048, max_position_embeddings=2048),
    # Shapes of EleutherAI/pythia-160m.
    "pythia-160m": NeoXConfig(vocab_size=50304, hidden_size=768, num_layers=12, num_heads=12,
                              intermediate_size=3072, max_position_embeddings=2048),
}
