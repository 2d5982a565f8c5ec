"""The reference GPT-NeoX split over torch.distributed ranks: tensor and pipeline parallel decode.

A world of ``tp * pp`` ranks; ``rank = pp_rank * tp + tp_rank``. Pipeline stage ``pp_rank``
holds a contiguous range of layers (the first stages take the extra layer of an uneven split);
stage 0 embeds the tokens, the last stage runs the final norm and the readout. Within a stage the
``tp`` ranks split every layer Megatron-style:

* attention: the fused QKV projection by heads (HF's per-head interleaved rows
  ``[q_h0, k_h0, v_h0, q_h1, ...]``, so a rank's heads are one contiguous row block), the output
  projection (``dense``) by its input columns;
* MLP: ``up`` by rows, ``down`` by columns;
* the two partial outputs of a layer are summed in one ``all_reduce`` over the stage's TP group
  (GPT-NeoX's parallel residual adds them anyway); the biases of ``dense`` and ``down`` are added
  once, after the reduce.

Each rank's attention layers drive its own queue cache exactly like the single-process model
(``cachescope.neox.model.Attention``): pop ``attn_kv_{prev}``, push ``attn_kv_{next}``, holding
only this rank's heads. Layer indices stay global, so owner labels (``layers.{g}.attention``) read
the same on every stage.

Every collective is torch.distributed's: ``all_reduce`` over the TP group, ``send``/``recv`` of the
``(B, T, C)`` activation between the same ``tp_rank`` of neighbouring stages, ``broadcast`` of the
picked token from the last stage's ``tp_rank`` 0 to the world. Works with gloo on CPU and NCCL on
GPUs (tensors live on the parameters' device).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cachescope._cache import Cache
from cachescope.neox.config import NeoXConfig
from cachescope.neox.generate import Decoder, pick_token
from cachescope.neox.hf import hf_state_dict
from cachescope.neox.model import MLP, Attention, NeoXModel, QueueCacheUser, TransformerLayer

__all__ = ["ParallelLayout", "ParallelNeoX", "ParallelDecoder", "ParallelWatchHandle",
           "parallel_generate"]


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits in a ``tp`` x ``pp`` grid of ranks.

    Build it with ``ParallelLayout.from_env(tp, pp)`` after ``dist.init_process_group``; the
    constructor itself is for tests and single-rank use (``ParallelLayout(1, 1, 0)`` needs no
    process group).
    """

    tp: int  # tensor-parallel ranks per pipeline stage
    pp: int  # pipeline stages
    rank: int  # this rank's global rank, pp_rank * tp + tp_rank
    tp_group: Any = field(default=None, compare=False)  # ProcessGroup of this rank's stage
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the shard lives

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.tp * self.pp:
            raise ValueError(f"rank must be an int in 0..{self.tp * self.pp - 1} for tp={self.tp} "
                             f"x pp={self.pp}, got {self.rank!r}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def global_rank(self, pp_rank: int, tp_rank: int) -> int:
        """The global rank at pipeline stage ``pp_rank``, tensor shard ``tp_rank``."""
        if not (0 <= pp_rank < self.pp and 0 <= tp_rank < self.tp):
            raise ValueError(f"(pp_rank, tp_rank) must be in (0..{self.pp - 1}, 0..{self.tp - 1}), "
                             f"got ({pp_rank}, {tp_rank})")
        return pp_rank * self.tp + tp_rank

    @property
    def prev_rank(self) -> int | None:
        """The rank this one receives activations from (same tp_rank, previous stage)."""
        return None if self.is_first_stage else self.global_rank(self.pp_rank - 1, self.tp_rank)

    @property
    def next_rank(self) -> int | None:
        """The rank this one sends activations to (same tp_rank, next stage)."""
        return None if self.is_last_stage else self.global_rank(self.pp_rank + 1, self.tp_rank)

    @property
    def token_src(self) -> int:
        """The rank that picks each token and broadcasts it: the last stage's tp_rank 0."""
        return self.global_rank(self.pp - 1, 0)

    def stage_layers(self, num_layers: int, pp_rank: int | None = None) -> range:
        """Global indices of the layers stage ``pp_rank`` (default: this rank's) holds.

        Contiguous; when ``pp`` does not divide ``num_layers`` the first stages get one layer
        more (5 layers over 2 stages: ``range(0, 3)``, ``range(3, 5)``).
        """
        stage = self.pp_rank if pp_rank is None else pp_rank
        if num_layers < self.pp:
            raise ValueError(
                f"each of the {self.pp} pipeline stages needs at least one layer, but the model has "
                f"num_layers={num_layers}; choose pp <= {num_layers}")
        base, extra = divmod(num_layers, self.pp)
        start = stage * base + min(stage, extra)
        return range(start, start + base + (1 if stage < extra else 0))

    def check(self, config: NeoXConfig) -> None:
        """Raise ``ValueError`` when ``config`` cannot be split over this layout."""
        inter = config.intermediate_size
        assert inter is not None
        if config.num_heads % self.tp:
            raise ValueError(
                f"tensor parallelism gives each of the tp={self.tp} ranks of a stage whole attention "
                f"heads, so tp must divide num_heads, got num_heads={config.num_heads}; choose tp "
                f"among {_divisors(math.gcd(config.num_heads, inter))}")
        if inter % self.tp:
            raise ValueError(
                f"tensor parallelism splits the MLP's intermediate_size evenly over the tp={self.tp} "
                f"ranks of a stage, got intermediate_size={inter}; choose tp among "
                f"{_divisors(math.gcd(config.num_heads, inter))} (the divisors of both "
                f"intermediate_size and num_heads={config.num_heads})")
        self.stage_layers(config.num_layers)

    @classmethod
    def from_env(cls, tp: int, pp: int = 1, *, device: str | torch.device | None = None) -> ParallelLayout:
        """This rank's layout in the initialised default process group; creates the TP groups.

        Every rank must call it (``dist.new_group`` is collective: each rank creates the group
        of every stage, in the same order). ``device`` defaults to ``cuda:LOCAL_RANK`` under
        NCCL (made the current CUDA device) and the CPU otherwise.
        """
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ParallelLayout.from_env needs an initialised torch.distributed default process "
                "group, found none; call dist.init_process_group('gloo' or 'nccl') first (under "
                "torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)")
        for name, value in (("tp", tp), ("pp", pp)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        world = dist.get_world_size()
        if tp * pp != world:
            raise ValueError(
                f"tp * pp must equal the world size (one rank per pipeline stage and tensor shard), "
                f"got tp={tp} x pp={pp} = {tp * pp} but the process group has {world} ranks; launch "
                f"{tp * pp} ranks (--nproc_per_node {tp * pp}) or choose tp and pp whose product is "
                f"{world}")
        rank = dist.get_rank()
        if device is None:
            if dist.get_backend() == "nccl":
                local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
                device = torch.device("cuda", local)
            else:
                device = torch.device("cpu")
        device = torch.device(device)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # NCCL's collectives run on the current device
        groups = [dist.new_group(list(range(p * tp, (p + 1) * tp))) for p in range(pp)]
        return cls(tp=tp, pp=pp, rank=rank, tp_group=groups[rank // tp], device=device)


class ParallelAttention(Attention):
    """This rank's heads of one attention layer; the cache protocol of ``Attention``, unchanged.

    ``qkv`` holds the rows of the rank's heads, ``dense`` the matching input columns without a
    bias: its output is a partial sum the layer all-reduces, then adds ``dense_bias`` once.
    """

    def __init__(self, config: NeoXConfig, layer_idx: int, tp: int) -> None:
        super().__init__(config, layer_idx)  # full-size projections (on meta), replaced below
        self.n_heads = config.num_heads // tp  # heads on this rank
        width = self.n_heads * self.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * width)
        self.dense = nn.Linear(width, config.hidden_size, bias=False)
        self.dense_bias = nn.Parameter(torch.empty(config.hidden_size))


class ParallelMLP(MLP):
    """This rank's columns of the MLP: ``up`` rows, ``down`` columns (no bias; ``down_bias`` is
    added once by the layer, after the reduce). ``MLP.forward`` unchanged."""

    def __init__(self, config: NeoXConfig, tp: int) -> None:
        super().__init__(config)  # full-size (on meta), replaced below
        assert config.intermediate_size is not None
        width = config.intermediate_size // tp
        self.up = nn.Linear(config.hidden_size, width)
        self.down = nn.Linear(width, config.hidden_size, bias=False)
        self.down_bias = nn.Parameter(torch.empty(config.hidden_size))


class ParallelLayer(TransformerLayer):
    """One layer, this rank's share: ``x + all_reduce(attn_part + mlp_part) + biases``."""

    def __init__(self, config: NeoXConfig, layer_idx: int, layout: ParallelLayout) -> None:
        super().__init__(config, layer_idx)  # replicated LayerNorms; full sublayers replaced below
        self.attention = ParallelAttention(config, layer_idx, layout.tp)
        self.mlp = ParallelMLP(config, layout.tp)
        self.tp_group = layout.tp_group if layout.tp > 1 else None

    def forward(self, x: Tensor) -> Tensor:
        partial = self.attention(self.ln1(x)) + self.mlp(self.ln2(x))  # (B, T, C), this rank's share
        if self.tp_group is not None:
            dist.all_reduce(partial, group=self.tp_group)  # sum over the stage's ranks
        return x + partial + (self.attention.dense_bias + self.mlp.down_bias)  # (B, T, C)


class ParallelWatchHandle:
    """Returned by ``ParallelNeoX.watch``: one ``cachescope.watch`` handle per local layer;
    ``remove()`` removes them all (idempotent); also a context manager."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    @property
    def hooked(self) -> list[str]:
        """Qualified names (global layer indices) of the modules carrying hooks."""
        return sorted(name for h in self.handles for name in h.hooked)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def __enter__(self) -> ParallelWatchHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


# Local parameter name (after "layers.{i}.") -> (full name after "layers.{g}.", how it is split):
# "rows" by this rank's share of dim 0, "cols" of dim 1, None replicated. "heads" shares are
# whole heads (of QKV: 3 * head_dim rows each), "inter" shares of intermediate_size.
_LAYER_SHARDS: dict[str, tuple[str, str | None, str | None]] = {
    "ln1.weight": ("ln1.weight", None, None),
    "ln1.bias": ("ln1.bias", None, None),
    "ln2.weight": ("ln2.weight", None, None),
    "ln2.bias": ("ln2.bias", None, None),
    "attention.qkv.weight": ("attention.qkv.weight", "rows", "qkv"),
    "attention.qkv.bias": ("attention.qkv.bias", "rows", "qkv"),
    "attention.dense.weight": ("attention.dense.weight", "cols", "heads"),
    "attention.dense_bias": ("attention.dense.bias", None, None),
    "mlp.up.weight": ("mlp.up.weight", "rows", "inter"),
    "mlp.up.bias": ("mlp.up.bias", "rows", "inter"),
    "mlp.down.weight": ("mlp.down.weight", "cols", "inter"),
    "mlp.down_bias": ("mlp.down.bias", None, None),
}


class ParallelNeoX(QueueCacheUser, nn.Module):
    """This rank's part of a GPT-NeoX: its stage's layers, each holding its tensor shard.

    ``forward(input_ids)`` is collective (every rank of the world calls it with the same shape):
    it returns the logits ``(B, T, vocab)`` on the last stage and None elsewhere. Build it with
    ``from_full``, ``from_config`` or ``from_hf_checkpoint``; the plain constructor leaves the
    parameters on the meta device.
    """

    def __init__(self, config: NeoXConfig, layout: ParallelLayout) -> None:
        super().__init__()
        layout.check(config)
        if layout.tp > 1 and layout.tp_group is None:
            raise ValueError(
                f"a layout with tp={layout.tp} needs its tensor-parallel process group, found "
                "tp_group=None; build the layout with ParallelLayout.from_env(tp, pp) after "
                "dist.init_process_group")
        self.config = config
        self.layout = layout
        self.layer_range = layout.stage_layers(config.num_layers)
        self.embed_in: nn.Embedding | None = None
        self.final_norm: nn.LayerNorm | None = None
        self.embed_out: nn.Linear | None = None
        with torch.device("meta"):
            if layout.is_first_stage:
                self.embed_in = nn.Embedding(   # explicit weight: see NeoXModel.__init__
                    config.vocab_size, config.hidden_size,
                    _weight=torch.empty(config.vocab_size, config.hidden_size))
            self.layers = nn.ModuleList([ParallelLayer(config, g, layout) for g in self.layer_range])
            if layout.is_last_stage:
                self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
                self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.eval()

    # -- construction ---------------------------------------------------------------------------

    def _shard_of(self, name: str, full: Mapping[str, Tensor]) -> Tensor:
        """The slice of the full model's state that local parameter ``name`` holds (a view)."""
        parts = name.split(".", 2)
        if parts[0] != "layers":
            return full[name]
        g = self.layer_range[int(parts[1])]
        full_suffix, dim, share = _LAYER_SHARDS[parts[2]]
        tensor = full[f"layers.{g}.{full_suffix}"]
        if dim is None:
            return tensor
        cfg, tp, r = self.config, self.layout.tp, self.layout.tp_rank
        assert cfg.intermediate_size is not None
        per_rank = {"qkv": 3 * cfg.hidden_size // tp, "heads": cfg.hidden_size // tp,
                    "inter": cfg.intermediate_size // tp}[share or ""]
        return tensor.narrow(0 if dim == "rows" else 1, r * per_rank, per_rank)

    def _load_full_state(self, full: Mapping[str, Tensor], *, device: torch.device,
                         dtype: torch.dtype | None) -> None:
        """Copy this rank's slices of ``full`` (a ``NeoXModel`` state dict) in; nothing of
        ``full`` stays referenced (every slice is copied)."""
        local: dict[str, Tensor] = {}
        for name, param in self.named_parameters():
            piece = self._shard_of(name, full)
            if tuple(piece.shape) != tuple(param.shape):
                raise ValueError(f"parameter {name} of this shard has shape {tuple(param.shape)}, "
                                 f"but the full model gives {tuple(piece.shape)}; the full model "
                                 "does not match this config")
            local[name] = piece.to(device=device, dtype=dtype or piece.dtype, copy=True,
                                   memory_format=torch.contiguous_format)
        self.load_state_dict(local, strict=True, assign=True)

    @classmethod
    def from_full(cls, full: NeoXModel, layout: ParallelLayout, *,
                  device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None) -> ParallelNeoX:
        """This rank's shard of ``full`` (seeded or HF-loaded), copied to ``device`` (default:
        ``layout.device``); ``full`` is left untouched and may be freed afterwards."""
        model = cls(full.config, layout)
        model._load_full_state(full.state_dict(), device=torch.device(device or layout.device),
                               dtype=dtype)
        return model.eval()

    @classmethod
    def from_config(cls, config: NeoXConfig, layout: ParallelLayout, *,
                    device: str | torch.device | None = None) -> ParallelNeoX:
        """The shard of ``NeoXModel(config)``: the same seeded weights. Builds the full model on
        the CPU, copies the shard, and frees the full model (peak: one full model per rank)."""
        layout.check(config)  # before the full model is built
        return cls.from_full(NeoXModel(config), layout, device=device)

    @classmethod
    def from_hf_checkpoint(cls, path: str | os.PathLike[str], layout: ParallelLayout, *,
                           dtype: torch.dtype = torch.float32,
                           device: str | torch.device | None = None) -> ParallelNeoX:
        """The shard of an HF GPT-NeoX checkpoint (``cachescope.neox.hf`` checks it whole, from
        the files' headers). Reads only the tensors this rank holds a slice of, one at a time
        (safetensors: each on its own; ``pytorch_model.bin``: memory-mapped), copying the slice
        out: a pipeline stage never reads another stage's layers."""
        config, state = hf_state_dict(path, dtype=dtype, lazy=True)
        layout.check(config)
        model = cls(config, layout)
        model._load_full_state(state, device=torch.device(device or layout.device), dtype=dtype)
        return model.eval()

    # -- cache and owners -----------------------------------------------------------------------

    def watch(self, cache: Any = None) -> ParallelWatchHandle:
        """``cachescope.watch`` every local layer under its global name (``layers.{g}.``), so
        owners read ``layers.{g}.attention`` on every stage."""
        from cachescope import watch

        handles: list[Any] = []
        try:
            for g, layer in zip(self.layer_range, self.layers):
                handles.append(watch(layer, cache, prefix=f"layers.{g}."))
        except BaseException:
            for h in handles:
                h.remove()
            raise
        return ParallelWatchHandle(handles)

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor) -> Tensor | None:
        assert input_ids.dim() == 2, f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}"
        assert input_ids.shape[1] > 0, "input_ids must hold at least one token"
        layout = self.layout
        if self.embed_in is not None:
            x = self.embed_in(input_ids)  # (B, T, C)
        else:
            param = next(self.parameters())
            B, T = input_ids.shape
            x = torch.empty(B, T, self.config.hidden_size, dtype=param.dtype, device=param.device)
            dist.recv(x, src=layout.prev_rank)  # (B, T, C) from the previous stage
        # Iterate self.layers at call time so fault injection can wrap or reorder it.
        for layer in self.layers:
            x = layer(x)  # (B, T, C)
        if self.embed_out is None:
            assert layout.next_rank is not None
            dist.send(x.contiguous(), dst=layout.next_rank)
            return None
        assert self.final_norm is not None
        return self.embed_out(self.final_norm(x))  # (B, T, vocab_size)


class ParallelDecoder(Decoder):
    """One decode run over all ranks, a token at a time (``cachescope.neox.generate.Decoder``'s
    protocol: ``generation(...)``, ``use_cache``, ``state_ids`` per step, ``end_step(tokens=1)``,
    cleanup of the run's ``attn_kv_*`` on exit). Every rank of the world runs one.

    Each ``step()`` is collective: the last stage's tp_rank 0 picks the token (greedy, or
    temperature / top-k sampling with the seeded generator) and broadcasts it to every rank.
    ``hooks`` (optional, any subset): ``before_step(step) -> bool`` runs before ``state_ids`` is
    set, and a result of ``False`` stops this rank's run (``step()`` returns None, ``stopped`` is
    set); ``token(step, token) -> int`` runs after the broadcast and gives the token this rank
    continues with. ``rank_check.note_inputs(ids)`` receives each step's input ids right after
    ``state_ids`` is set. ``logits`` holds the last step's next-token logits (vocab,) on the last
    stage, None elsewhere.
    """

    model: ParallelNeoX

    def __init__(
        self,
        model: ParallelNeoX,
        prompt_ids: Sequence[int] | Tensor,
        max_new_tokens: int,
        *,
        cache: Cache | None = None,
        use_cache: bool = True,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int | None = None,
        cleanup: bool = True,
        hooks: Any = None,
        rank_check: Any = None,
    ) -> None:
        super().__init__(model, prompt_ids, max_new_tokens, cache=cache,  # type: ignore[arg-type]
                         use_cache=use_cache, temperature=temperature, top_k=top_k, seed=seed,
                         cleanup=cleanup)
        self.layout = model.layout
        self._before_step = getattr(hooks, "before_step", None)
        self._token_hook = getattr(hooks, "token", None)
        self._note_inputs = getattr(rank_check, "note_inputs", None)
        #: set when hooks.before_step returned False: this rank left the run
        self.stopped = False
        #: the last step's next-token logits (vocab,) on the last stage; None elsewhere
        self.logits: Tensor | None = None

    @property
    def done(self) -> bool:
        """Whether ``max_new_tokens`` tokens have been produced or this rank stopped."""
        return self.stopped or len(self.tokens) >= self.max_new_tokens

    def step(self) -> int | None:  # type: ignore[override]
        """One collective forward; returns the token this rank continues with, or None when
        ``hooks.before_step`` stopped this rank."""
        if self._generation is None:
            raise RuntimeError("ParallelDecoder.step() outside its `with` block")
        if self.done:
            raise RuntimeError("this ParallelDecoder has stopped (hooks.before_step returned False)"
                               if self.stopped else
                               f"this ParallelDecoder has produced its {self.max_new_tokens} tokens")
        cache, tokens, layout = self.cache, self.tokens, self.layout
        i = len(tokens)
        if self._before_step is not None and self._before_step(i) is False:
            self.stopped = True
            return None
        self._steps_started += 1
        if self.use_cache:
            cache.set("state_ids", (None, 0) if i == 0 else (i - 1, i))
            step_input = self.prompt if i == 0 else tokens[-1:]
        else:
            step_input = self.prompt + tokens
        if self._note_inputs is not None:
            self._note_inputs(list(step_input))
        x = torch.tensor([step_input], dtype=torch.long, device=self._device)  # (1, T)
        logits = self.model(x)  # (1, T, vocab) on the last stage, else None
        picked = 0
        if logits is not None:
            self.logits = logits[0, -1]  # (vocab,)
            if layout.tp_rank == 0:
                picked = pick_token(self.logits, self.temperature, self.top_k, self._generator)
        if layout.world_size > 1:
            box = torch.tensor([picked], dtype=torch.long, device=self._device)
            dist.broadcast(box, src=layout.token_src)
            picked = int(box.item())
        token = picked if self._token_hook is None else int(self._token_hook(i, picked))
        tokens.append(token)
        if self._end_step is not None:
            self._end_step(tokens=1)
        return token


def parallel_generate(
    model: ParallelNeoX,
    prompt_ids: Sequence[int] | Tensor,
    max_new_tokens: int,
    *,
    cache: Cache | None = None,
    use_cache: bool = True,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    on_step: Callable[[int, int], Any] | None = None,
    hooks: Any = None,
    rank_check: Any = None,
    cleanup: bool = True,
) -> list[int]:
    """``cachescope.neox.generate.generate`` over all ranks: every rank calls it with the same
    arguments and gets the same tokens (unless ``hooks.token`` changes this rank's). A loop over
    ``ParallelDecoder.step()``; stops early on a rank whose ``hooks.before_step`` returned False.
    ``on_step(step_index, token_id)`` is called after each produced token."""
    decoder = ParallelDecoder(model, prompt_ids, max_new_tokens, cache=cache, use_cache=use_cache,
                              temperature=temperature, top_k=top_k, seed=seed, cleanup=cleanup,
                              hooks=hooks, rank_check=rank_check)
    if max_new_tokens == 0:
        return []
    with torch.no_grad(), model.using_cache(decoder.cache), decoder:
        for i in range(max_new_tokens):
            token = decoder.step()
            if token is None:
                break
            if on_step is not None:
                on_step(i, token)
    return decoder.tokens
