"""Decode loop for the reference model, driving the queue cache the way labml's NeoX does."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from cachescope import _cache
from cachescope._cache import Cache
from cachescope.neox.model import NeoXModel

__all__ = ["Decoder", "generate", "logits_for", "pick_token"]

_MISSING = object()


def _as_token_list(prompt_ids: Sequence[int] | Tensor) -> list[int]:
    if isinstance(prompt_ids, Tensor):
        if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:
            prompt_ids = prompt_ids[0]
        if prompt_ids.dim() != 1:
            raise ValueError(f"prompt_ids must be 1-D (batch 1), got shape {tuple(prompt_ids.shape)}")
        return [int(t) for t in prompt_ids.tolist()]
    return [int(t) for t in prompt_ids]


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def pick_token(logits: Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> int:
    """Greedy for temperature 0, else temperature/top-k sampling. ``logits``: (vocab,)."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    scaled = logits.float().cpu() / temperature  # (vocab,)
    if top_k is not None and top_k < scaled.shape[0]:
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _safe_clear(cache: Cache, name: str, *, queue: bool) -> None:
    """Remove ``name`` if it is there (a queue when ``queue`` else a plain value); never raise."""
    try:
        present = cache.q_size(name) is not None if queue else cache.get(name, _MISSING) is not _MISSING
        if present:
            cache.clear(name)
    except KeyError:
        pass


def logits_for(model: NeoXModel, ids: Sequence[int] | Tensor) -> Tensor:
    """Next-token logits (T, vocab) for every position of ``ids``, recomputed without any cache.

    Uses a throwaway ``Cache`` so the process-wide cache is neither read nor written.
    """
    tokens = _as_token_list(ids)
    with torch.no_grad(), model.using_cache(Cache()):
        x = torch.tensor([tokens], dtype=torch.long, device=_device_of(model))  # (1, T)
        return model(x)[0]  # (T, vocab)


class Decoder:
    """One labml-style decode run, a token at a time: ``generate`` is a loop over ``step()``.

    ``with Decoder(model, prompt, n, cache=cache) as d: ...`` opens the run (the cache's
    ``generation(...)`` when it has one, ``use_cache`` set) and closes it on exit, removing what the
    run left in the cache when ``cleanup`` is set (also on error). Each ``step()`` runs one forward
    and returns the token it picked. The caller points the model at the cache
    (``model.using_cache(cache)``) and turns off autograd around the steps; ``generate`` does both
    once for the whole run. Driving several decoders step by step on one model is how
    ``benchmarks/bench.py`` interleaves a plain and an instrumented cache token by token.
    """

    def __init__(
        self,
        model: NeoXModel,
        prompt_ids: Sequence[int] | Tensor,
        max_new_tokens: int,
        *,
        cache: Cache | None = None,
        use_cache: bool = True,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int | None = None,
        cleanup: bool = True,
    ) -> None:
        prompt = _as_token_list(prompt_ids)
        if not prompt:
            raise ValueError("prompt_ids must hold at least one token")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be None or >= 1, got {top_k}")
        self.model = model
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.cache: Cache = _cache.get_cache() if cache is None else cache
        self.use_cache = use_cache
        self.temperature = temperature
        self.top_k = top_k
        self.cleanup = cleanup
        #: the tokens produced so far
        self.tokens: list[int] = []
        self._device = _device_of(model)
        self._generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        self._steps_started = 0  # forwards begun; with use_cache, step i pushes to queue attn_kv_{i}
        self._end_step = getattr(self.cache, "end_step", None)
        self._generation: contextlib.AbstractContextManager[Any] | None = None

    @property
    def done(self) -> bool:
        """Whether ``max_new_tokens`` tokens have been produced."""
        return len(self.tokens) >= self.max_new_tokens

    def __enter__(self) -> Decoder:
        if self._generation is not None:
            raise RuntimeError("this Decoder is already open; a Decoder runs once")
        cache = self.cache
        generation: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if hasattr(cache, "generation"):
            generation = cache.generation(prompt_tokens=len(self.prompt),
                                          max_new_tokens=self.max_new_tokens)
        generation.__enter__()
        self._generation = generation
        try:
            cache.set("use_cache", self.use_cache)
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def step(self) -> int:
        """One forward (the prompt on the first call, then the last token); returns the new token."""
        if self._generation is None:
            raise RuntimeError("Decoder.step() outside its `with` block")
        if self.done:
            raise RuntimeError(f"this Decoder has produced its {self.max_new_tokens} tokens")
        cache, tokens = self.cache, self.tokens
        i = len(tokens)
        self._steps_started += 1
        if self.use_cache:
            cache.set("state_ids", (None, 0) if i == 0 else (i - 1, i))
            step_input = self.prompt if i == 0 else tokens[-1:]
        else:
            step_input = self.prompt + tokens
        x = torch.tensor([step_input], dtype=torch.long, device=self._device)  # (1, T)
        logits = self.model(x)[0, -1]  # (vocab,)
        token = pick_token(logits, self.temperature, self.top_k, self._generator)
        tokens.append(token)
        if self._end_step is not None:
            self._end_step(tokens=1)
        return token

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        generation, self._generation = self._generation, None
        try:
            if generation is not None:
                generation.__exit__(exc_type, exc, tb)
        finally:
            if self.cleanup:
                cache = self.cache
                if self.use_cache:
                    for i in range(self._steps_started):
                        _safe_clear(cache, f"attn_kv_{i}", queue=True)
                    _safe_clear(cache, "state_ids", queue=False)
                _safe_clear(cache, "use_cache", queue=False)


def generate(
    model: NeoXModel,
    prompt_ids: Sequence[int] | Tensor,
    max_new_tokens: int,
    *,
    cache: Cache | None = None,
    use_cache: bool = True,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    on_step: Callable[[int, int], Any] | None = None,
    cleanup: bool = True,
) -> list[int]:
    """Generate ``max_new_tokens`` tokens after ``prompt_ids`` (batch 1); returns the new tokens only.

    With ``use_cache`` the prompt goes through one forward with ``state_ids=(None, 0)`` and each
    further token through one forward with ``state_ids=(i, i + 1)``, labml-style; without it the
    whole sequence is recomputed every step (``use_cache`` is set False in the cache).
    ``cache=None`` means ``cachescope._cache.get_cache()`` at call time; the model's attention
    layers use the same cache for the call. Caches with ``generation(...)`` / ``end_step(...)``
    (``InstrumentedCache``) are told about the run and about each step's end.
    ``cleanup`` (default) removes, once the run is over (also on error), the ``attn_kv_*`` queues
    this call created and the ``use_cache`` / ``state_ids`` values it set; with
    ``cleanup=False`` the cache is left as labml leaves it.
    ``on_step(step_index, token_id)`` is called after each produced token.
    A loop over ``Decoder.step()``; see ``Decoder`` to drive a run token by token.
    """
    decoder = Decoder(model, prompt_ids, max_new_tokens, cache=cache, use_cache=use_cache,
                      temperature=temperature, top_k=top_k, seed=seed, cleanup=cleanup)
    if max_new_tokens == 0:
        return []
    with torch.no_grad(), model.using_cache(decoder.cache), decoder:
        step = decoder.step
        for i in range(max_new_tokens):
            token = step()
            if on_step is not None:
                on_step(i, token)
    return decoder.tokens
