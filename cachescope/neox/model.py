"""A small, readable GPT-NeoX that uses the queue cache exactly as labml.ai's NeoX does.

Layout and numerics match Hugging Face's ``GPTNeoXForCausalLM`` (fused, per-head interleaved
QKV; partial rotary embeddings with the rotate-half convention; parallel residual; untied
readout), so HF checkpoints load into it (see ``cachescope.neox.hf``).

Cache protocol (labml's, per attention layer and forward call):

* ``cache.get('use_cache', False)`` is false: nothing else touches the cache.
* otherwise ``prev, nxt = cache.get('state_ids')``; when ``prev`` is not None, pop the past
  ``(k, v)`` from queue ``attn_kv_{prev}`` and prepend it; then push the full ``(k, v)``
  (post-rotary, shaped ``(B, n_head, T_total, head_dim)``) to queue ``attn_kv_{nxt}``.
  Layers run in order, so each queue is FIFO with one entry per layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cachescope import _cache
from cachescope._cache import Cache
from cachescope.neox.config import NeoXConfig

__all__ = ["NeoXModel", "QueueCacheUser", "TransformerLayer", "Attention", "MLP", "apply_rotary"]


def apply_rotary(x: Tensor, past: int, rotary_dim: int, base: float) -> Tensor:
    """Rotate the first ``rotary_dim`` dims of each head of ``x`` (B, n_head, T, head_dim).

    Token t of ``x`` sits at absolute position ``past + t``. Uses the GPT-NeoX / HF
    "rotate half" pairing: dim i is paired with dim i + rotary_dim/2.
    """
    if rotary_dim == 0:
        return x
    T = x.shape[2]
    half = torch.arange(0, rotary_dim, 2, device=x.device, dtype=torch.float32)  # (rotary_dim/2,)
    inv_freq = 1.0 / (base ** (half / rotary_dim))  # (rotary_dim/2,)
    pos = torch.arange(past, past + T, device=x.device, dtype=torch.float32)  # (T,)
    freqs = pos[:, None] * inv_freq[None, :]  # (T, rotary_dim/2)
    angles = torch.cat([freqs, freqs], dim=-1)  # (T, rotary_dim)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)  # broadcast over (B, n_head)

    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]  # (B, n_head, T, rotary_dim), (..., rest)
    x1, x2 = x_rot.chunk(2, dim=-1)  # each (B, n_head, T, rotary_dim/2)
    rotated_half = torch.cat([-x2, x1], dim=-1)  # (B, n_head, T, rotary_dim)
    return torch.cat([x_rot * cos + rotated_half * sin, x_pass], dim=-1)  # (B, n_head, T, head_dim)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary embeddings and the labml queue cache."""

    def __init__(self, config: NeoXConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_heads
        self.head_dim = config.head_dim
        self.rotary_dim = config.rotary_dim
        self.rotary_base = config.rotary_base
        self.max_positions = config.max_position_embeddings
        # Fused projection, HF layout: output features are [q_h0, k_h0, v_h0, q_h1, k_h1, v_h1, ...].
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        # The cache this layer talks to; None means "cachescope._cache.get_cache() at call time".
        self.cache: Cache | None = None

    def _current_cache(self) -> Cache:
        # Look the singleton up through the module on every call so that swapping it
        # (cachescope.install()) takes effect without rebuilding the model.
        return self.cache if self.cache is not None else _cache.get_cache()

    def forward(self, x: Tensor) -> Tensor:
        assert x.dim() == 3, f"Attention expects (B, T, C), got shape {tuple(x.shape)}"
        B, T, C = x.shape
        cache = self._current_cache()

        qkv = self.qkv(x)  # (B, T, 3*C)
        qkv = qkv.view(B, T, self.n_heads, 3 * self.head_dim)  # (B, T, n_head, 3*head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each (B, T, n_head, head_dim), views of qkv
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # each (B, n_head, T, head_dim)

        use_cache = bool(cache.get("use_cache", False))
        k_past: Tensor | None = None
        v_past: Tensor | None = None
        next_state = None
        if use_cache:
            state_ids = cache.get("state_ids")
            assert state_ids is not None, "cache has use_cache=True but no 'state_ids' (prev, next) set"
            prev_state, next_state = state_ids
            if prev_state is not None:
                k_past, v_past = cache.pop(f"attn_kv_{prev_state}")  # each (B, n_head, T_past, head_dim)

        past = 0 if k_past is None else k_past.shape[2]
        assert past + T <= self.max_positions, (
            f"sequence length {past + T} exceeds max_position_embeddings={self.max_positions}"
        )
        q = apply_rotary(q, past, self.rotary_dim, self.rotary_base)  # (B, n_head, T, head_dim)
        k = apply_rotary(k, past, self.rotary_dim, self.rotary_base)  # (B, n_head, T, head_dim)

        if k_past is not None:
            assert v_past is not None and k_past.shape[:2] == (B, self.n_heads), (
                f"popped past k of shape {tuple(k_past.shape)} does not fit batch {B} x {self.n_heads} heads"
            )
            k = torch.cat([k_past, k], dim=2)  # (B, n_head, T_past + T, head_dim)
            v = torch.cat([v_past, v], dim=2)  # (B, n_head, T_past + T, head_dim)
        if use_cache:
            # On the prompt step v is still a strided view of qkv (like labml); do not make it contiguous.
            cache.push(f"attn_kv_{next_state}", (k, v))

        S = k.shape[2]  # keys visible: past + new
        if T == 1:
            y = F.scaled_dot_product_attention(q, k, v)  # the single new query sees everything
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # query t (absolute position past + t) may see keys 0 .. past + t
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)  # (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # y: (B, n_head, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, C); a head subset under TP
        return self.dense(y)  # (B, T, C)


class MLP(nn.Module):
    """Position-wise feed-forward: Linear, exact GELU, Linear."""

    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        assert config.intermediate_size is not None
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))  # (B, T, C) -> (B, T, inter) -> (B, T, C)


class TransformerLayer(nn.Module):
    """One GPT-NeoX layer with the parallel residual: x + attn(ln1(x)) + mlp(ln2(x))."""

    def __init__(self, config: NeoXConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attention(self.ln1(x)) + self.mlp(self.ln2(x))  # (B, T, C)


class QueueCacheUser:
    """For models whose ``Attention`` layers talk to a queue cache (``NeoXModel``, the parallel
    ``ParallelNeoX``): find them, and point them at a cache for a ``with`` block."""

    def attention_modules(self) -> list[Attention]:
        """Every Attention module, found through ``modules()`` so wrapped layers are included."""
        return [m for m in self.modules() if isinstance(m, Attention)]  # type: ignore[attr-defined]

    @contextmanager
    def using_cache(self, cache: Cache | None) -> Iterator[Any]:
        """Point every attention layer at ``cache`` for the ``with`` block, then restore."""
        attentions = self.attention_modules()
        saved = [a.cache for a in attentions]
        for a in attentions:
            a.cache = cache
        try:
            yield self
        finally:
            for a, previous in zip(attentions, saved):
                a.cache = previous


class NeoXModel(QueueCacheUser, nn.Module):
    """GPT-NeoX decoder: token ids (B, T) -> next-token logits (B, T, vocab_size).

    Weights are random, drawn from a ``torch.Generator`` seeded with ``config.seed``, so the
    same config always gives the same model. With ``init_weights=False`` the parameters are
    left on the meta device, for ``load_state_dict(..., assign=True)`` (used by the HF loader).
    """

    def __init__(self, config: NeoXConfig, *, init_weights: bool = True) -> None:
        super().__init__()
        self.config = config
        # Build on the meta device: skips torch's default init, which we would overwrite anyway.
        with torch.device("meta"):
            # An explicit (meta) weight: Embedding's own init on meta imports torch's compile
            # machinery, about a second per process (each rank of a multi-rank run pays it).
            self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
            self.layers = nn.ModuleList([TransformerLayer(config, i) for i in range(config.num_layers)])
            self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if init_weights:
            self.to_empty(device="cpu")
            self.reset_parameters()
        self.eval()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Seeded init: N(0, 0.02) for Linear/Embedding weights, zero biases, unit LayerNorms."""
        generator = torch.Generator(device="cpu").manual_seed(self.config.seed)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                w = torch.empty(module.weight.shape, dtype=torch.float32)
                w.normal_(0.0, 0.02, generator=generator)
                module.weight.copy_(w)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def forward(self, input_ids: Tensor) -> Tensor:
        assert input_ids.dim() == 2, f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}"
        assert input_ids.shape[1] > 0, "input_ids must hold at least one token"
        x = self.embed_in(input_ids)  # (B, T, C)
        # Iterate self.layers at call time so fault injection can wrap or reorder it.
        for layer in self.layers:
            x = layer(x)  # (B, T, C)
        x = self.final_norm(x)  # (B, T, C)
        return self.embed_out(x)  # (B, T, vocab_size)
