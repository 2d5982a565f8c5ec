"""Shared helpers for tests that drive labml-style layers through a cache.

Every layer here uses the queue cache exactly like labml's NeoX: read ``state_ids``, pop
``attn_kv_{prev}`` when ``prev`` is not None, push ``attn_kv_{next}``. ``Attention`` is a small
real attention layer (weights, a growing ``(k, v)`` pair); ``KVLayer`` is the bare protocol with
the pushed value, the queue prefix and the cache lookup as parameters, for tests that only need
the cache traffic. ``decode`` is the labml loop over such layers, ``labml_decode`` the same loop
over labml_nn's own layers through labml's own ``get_cache()``.

Imports torch: tests/conftest.py must not import this module at module level.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

import cachescope

DIM = 4


class Attention(nn.Module):
    """A labml-style attention layer: pops ``attn_kv_{prev}``, pushes ``attn_kv_{next}``."""

    def __init__(self, cache: Any = None, dim: int = DIM, seed: int = 0, fail: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Parameter(torch.randn(dim, 3 * dim, generator=g) / dim ** 0.5)
        self.cache = cache
        self.fail = fail   # raise after pushing (a step that dies half-way)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self.cache if self.cache is not None else cachescope.get_cache()
        q, k, v = (x @ self.proj).chunk(3, dim=-1)          # each (T, dim)
        prev, nxt = cache.get("state_ids")
        if prev is not None:
            k_past, v_past = cache.pop(f"attn_kv_{prev}")
            k, v = torch.cat([k_past, k]), torch.cat([v_past, v])
        cache.push(f"attn_kv_{nxt}", (k, v))
        if self.fail:
            raise RuntimeError("layer failed mid-forward")
        att = torch.softmax(q @ k.T / k.shape[-1] ** 0.5, dim=-1)
        return x + att @ v


class KVLayer(nn.Module):
    """The bare labml cache protocol, no attention math: reads ``state_ids``, pops
    ``{prefix}{prev}`` when ``prev`` is not None, pushes ``{prefix}{next}``; returns its input
    (plus ``index``).

    - ``cache``: the cache to use; else ``get_cache()`` is called at every forward (default
      ``cachescope.get_cache``; labml's own ``get_cache`` works too).
    - ``kv(x)``: the value pushed (default the pair ``(x, x)``).
    - ``cat``: when set, the popped ``(k, v)`` pair is concatenated with the new one along this
      dimension before it is pushed (a growing KV cache); else the popped value is dropped.
    - ``index``: kept as ``self.index`` and added to the output, so that layers differ.
    """

    def __init__(self, cache: Any = None, *, get_cache: Callable[[], Any] | None = None,
                 prefix: str = "attn_kv_", kv: Callable[[torch.Tensor], Any] | None = None,
                 cat: int | None = None, index: int = 0) -> None:
        super().__init__()
        self.cache = cache
        self.get_cache = get_cache
        self.prefix = prefix
        self.kv = kv if kv is not None else (lambda x: (x, x))
        self.cat = cat
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self.cache if self.cache is not None else (self.get_cache or cachescope.get_cache)()
        prev, nxt = cache.get("state_ids")
        value = self.kv(x)
        if prev is not None:
            past = cache.pop(f"{self.prefix}{prev}")
            if self.cat is not None:
                value = tuple(torch.cat([p, n], self.cat) for p, n in zip(past, value))
        cache.push(f"{self.prefix}{nxt}", value)
        return x + self.index if self.index else x


def filled_kv(fill: float = 0.0) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A ``kv`` for ``KVLayer``: one tensor of shape ``(1, 2, T, 4)`` filled with ``fill``, as
    both k and v (``T``: the input's tokens, its second dimension)."""
    def kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = v = x.new_full((1, 2, x.shape[1], 4), fill)
        return k, v
    return kv


class Block(nn.Module):
    """A transformer block whose own forward never touches the cache."""

    def __init__(self, cache: Any = None, seed: int = 0) -> None:
        super().__init__()
        self.attention = Attention(cache, seed=seed)
        self.mlp = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        return x + self.mlp(x)


class Net(nn.Module):
    """``layers.{i}.attention`` naming, like GPT-NeoX."""

    def __init__(self, n_layers: int, cache: Any = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(cache, seed=i) for i in range(n_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def layers(n: int, cache: Any = None) -> nn.ModuleList:
    return nn.ModuleList([Attention(cache, seed=i) for i in range(n)])


def run(modules: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for m in modules:
        x = m(x)
    return x


def decode(modules: Sequence[nn.Module], cache: Any, steps: int, *, order=None,
           end_steps: bool = True, inputs: Callable[[int], torch.Tensor] | None = None
           ) -> list[torch.Tensor]:
    """Prompt step ``(None, 0)`` then ``steps`` steps ``(i, i + 1)``; returns each step's output.

    ``order(step) -> list of module indices`` overrides the layer order of a step (for faults).
    ``inputs(step)`` gives each step's input (by default a 3-token prompt, then the last row of
    the previous step's output). With ``end_steps`` each step ends with ``end_step(tokens=1)``.
    """
    outs = []
    x = torch.linspace(-1, 1, 3 * DIM).reshape(3, DIM)
    with torch.no_grad():
        for i in range(steps + 1):
            cache.set("state_ids", (None, 0) if i == 0 else (i - 1, i))
            idx = order(i) if order is not None else range(len(modules))
            y = inputs(i) if inputs is not None else x
            for j in idx:
                y = modules[j](y)
            outs.append(y)
            if end_steps and hasattr(cache, "end_step"):
                cache.end_step(tokens=1)
            x = y[-1:]
    return outs


def zeros_input(prompt_len: int) -> Callable[[int], torch.Tensor]:
    """``inputs`` for ``decode``: zeros of shape ``(1, prompt_len, 4)`` at the prompt step, then
    ``(1, 1, 4)`` (one token) at every later step."""
    return lambda i: torch.zeros(1, prompt_len if i == 0 else 1, 4)


def labml_decode(layers: nn.Sequential, tokens: torch.Tensor, prompt_len: int,
                 swap_at: int | None = None) -> list[torch.Tensor]:
    """labml's decode loop: the prompt with state_ids (None, 0), then one token per step with
    (i, i + 1), everything through labml's own ``get_cache()``. ``swap_at``: the step at which
    layers 1 and 2 run in the wrong order. Returns each step's output for the last position."""
    from labml_nn.neox.utils import cache as labml_cache
    cache = labml_cache.get_cache()
    cache.set("use_cache", True)
    outputs = []
    with torch.no_grad():
        cache.set("state_ids", (None, 0))
        outputs.append(layers(tokens[:, :prompt_len])[:, -1])
        for i in range(tokens.shape[1] - prompt_len):
            cache.set("state_ids", (i, i + 1))
            run = layers
            if i + 1 == swap_at:
                run = nn.Sequential(layers[0], layers[2], layers[1], *layers[3:])
            outputs.append(run(tokens[:, prompt_len + i:prompt_len + i + 1])[:, -1])
    return outputs
