"""Tiny random Hugging Face models (no downloads) and the bugs the cachescope.hf tests plant.

Imported only by the tests that need transformers (torch and transformers are imported here, at
module level). The tests run on the transformers of the main venv and on the oldest release
scripts/test_transformers.sh pins; ``CACHE_KW`` and ``returned_cache`` bridge the one API rename
between them.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator

import torch
import transformers
from torch import nn

PROMPT = [[5, 6, 7, 8, 9]]


def _release(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    assert m, f"cannot read transformers version {version!r}"
    return int(m.group(1)), int(m.group(2))


#: The installed transformers, ``(major, minor)``.
TRANSFORMERS = _release(transformers.__version__)

#: The keyword that hands a cache to a model's forward / ``generate()`` (and that decoder layers
#: receive, Llama-style): transformers 5.24 renamed ``past_key_values=`` to ``cache=`` (the old
#: name is still accepted, deprecated), and the outputs' ``.past_key_values`` to ``.cache``.
CACHE_KW = "cache" if TRANSFORMERS >= (5, 24) else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The cache a model's forward or ``generate(return_dict_in_generate=True)`` returned
    (``output.cache``; ``output.past_key_values`` before transformers 5.24); never None."""
    cache = getattr(output, CACHE_KW)
    assert cache is not None, f"{type(output).__name__}.{CACHE_KW} is None"
    return cache


def neox(layers: int = 3, *, seed: int = 0, init: float = 0.5) -> Any:
    """A random GPTNeoXForCausalLM: hidden 32, 4 heads, vocab 128 (``init`` large enough that
    greedy tokens vary, so that an assistant's candidates are sometimes rejected)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=256,
                        eos_token_id=None, pad_token_id=0, bos_token_id=1, initializer_range=init)
    return GPTNeoXForCausalLM(cfg).eval()


def llama(layers: int = 3, *, seed: int = 0, init: float = 0.5, sliding_window: int | None = None) -> Any:
    """A random LlamaForCausalLM: hidden 32, 4 heads (2 KV heads, grouped), vocab 128."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                      max_position_embeddings=256, eos_token_id=None, pad_token_id=0,
                      bos_token_id=1, initializer_range=init)
    return LlamaForCausalLM(cfg).eval()


def ids(rows: list[list[int]] | None = None) -> torch.Tensor:
    return torch.tensor(rows or PROMPT)


def decoder_layers(model: Any) -> nn.ModuleList:
    """The ModuleList of decoder layers (GPT-NeoX: ``gpt_neox.layers``; Llama: ``model.layers``)."""
    base = getattr(model, "gpt_neox", None) or model.model
    return base.layers


def attention(layer: nn.Module) -> nn.Module:
    return getattr(layer, "attention", None) or layer.self_attn


# ------------------------------------------------------------------------------ planted bugs
def prune(model: Any, i: int) -> None:
    """Remove decoder layer ``i`` without renumbering the layer_idx of the ones after it."""
    del decoder_layers(model)[i]


def dup_layer_idx(model: Any, src: int, dst: int) -> None:
    """Give layer ``dst`` the layer_idx of layer ``src`` (a copied layer)."""
    attention(decoder_layers(model)[dst]).layer_idx = src


@contextlib.contextmanager
def skip_layer_at(model: Any, layer: int, step: int) -> Iterator[None]:
    """Decoder layer ``layer`` does nothing (its attention never updates the cache) in the
    ``step``-th forward of ``model`` (counted from 0)."""
    target = decoder_layers(model)[layer]
    count = [-1]

    def on_forward(_m: Any, _a: Any, _k: Any) -> None:
        count[0] += 1
        if count[0] == step:
            target.forward = lambda hidden_states, *a, **k: hidden_states
        else:
            target.__dict__.pop("forward", None)

    handle = model.register_forward_pre_hook(on_forward, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        target.__dict__.pop("forward", None)


@contextlib.contextmanager
def on_layer_at(model: Any, layer: int, step: int, action: Callable[[Any], None]) -> Iterator[None]:
    """Run ``action(cache)`` just before decoder layer ``layer`` in the ``step``-th forward."""
    count = [-1]

    def on_forward(_m: Any, _a: Any, _k: Any) -> None:
        count[0] += 1

    def before_layer(_m: Any, args: Any, kwargs: Any) -> None:
        if count[0] == step:
            cache = kwargs.get("layer_past", kwargs.get(CACHE_KW))
            assert cache is not None, f"decoder layer {layer} got no cache: {sorted(kwargs)}"
            action(cache)

    handles = [model.register_forward_pre_hook(on_forward, with_kwargs=True),
               decoder_layers(model)[layer].register_forward_pre_hook(before_layer, with_kwargs=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def extra_tokens_on(cache: Any, layer: int, extra: int = 1) -> None:
    """Make ``cache.update`` of ``layer`` store ``extra`` more keys/values than it is given (an
    instance attribute over the class's ``update``, which cachescope patched)."""
    cls_update = type(cache).update

    def update(key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> Any:
        if layer_idx == layer:
            key_states = torch.cat([key_states, key_states[..., -extra:, :]], dim=-2)
            value_states = torch.cat([value_states, value_states[..., -extra:, :]], dim=-2)
        return cls_update(cache, key_states, value_states, layer_idx, *args, **kwargs)

    cache.update = update
