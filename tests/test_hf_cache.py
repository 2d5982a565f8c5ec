"""cachescope.hf: transformers' own generate() on tiny random GPT-NeoX and Llama models, checked.

Correct runs (every decoding mode) give the same tokens as without cachescope and no violation;
each planted bug is caught with its kind, step and layer.
"""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
import weakref
from typing import Any, Callable

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from transformers import DynamicCache  # noqa: E402
from transformers import cache_utils  # noqa: E402
from transformers.generation.utils import GenerationMixin  # noqa: E402

import cachescope.hf as hf  # noqa: E402
from cachescope import InstrumentedCache, PopOrderError  # noqa: E402
from _hf_models import (CACHE_KW, TRANSFORMERS, dup_layer_idx, extra_tokens_on, ids,  # noqa: E402
                        llama, neox, on_layer_at, prune, returned_cache, skip_layer_at)
from _helpers import plugin_autoloaded  # noqa: E402
from _loop import otel_memory  # noqa: E402

pytest_plugins = ["pytester"]

ATTRIBUTES = {
    "neox": ("gpt_neox.layers.{}.attention", neox),
    "llama": ("model.layers.{}.self_attn", llama),
}


@pytest.fixture(autouse=True)
def _uninstalled() -> Any:
    """Every test starts and ends with cachescope.hf uninstalled."""
    hf.uninstall()
    yield
    hf.uninstall()


def _install(**options: Any) -> Any:
    options.setdefault("registry", CollectorRegistry())
    options.setdefault("tracing", False)
    return hf.install(**options)


def _found(rec: Any) -> list[tuple[str, int, str]]:
    return [(v.kind, v.step, v.queue) for v in rec.violations]


# ------------------------------------------------------------------------- correct runs
def _modes(kind: str) -> dict[str, Callable[[Any], Any]]:
    build = ATTRIBUTES[kind][1]
    assistant = build(2, seed=3)
    padded = ids([[0, 0, 7, 8, 9], [5, 6, 7, 8, 9]])
    mask = (padded != 0).long()

    def reuse(model: Any) -> Any:
        first = model.generate(ids(), max_new_tokens=4, return_dict_in_generate=True)
        prompt = torch.cat([first.sequences, torch.tensor([[11, 12]])], dim=1)
        return model.generate(prompt, **{CACHE_KW: returned_cache(first)}, max_new_tokens=4)

    return {
        "greedy": lambda m: m.generate(ids(), max_new_tokens=8),
        "sampling": lambda m: m.generate(ids(), max_new_tokens=8, do_sample=True, top_k=20),
        "beam": lambda m: m.generate(ids(), max_new_tokens=6, num_beams=3),
        "static": lambda m: m.generate(ids(), max_new_tokens=8, cache_implementation="static"),
        "static-beam": lambda m: m.generate(ids(), max_new_tokens=6, num_beams=2,
                                            cache_implementation="static"),
        "assisted": lambda m: m.generate(ids(), max_new_tokens=8, assistant_model=assistant),
        "assisted-sampling": lambda m: m.generate(ids(), max_new_tokens=8, do_sample=True,
                                                  assistant_model=assistant),
        "prompt-lookup": lambda m: m.generate(ids([[5, 6, 7, 5, 6, 7, 5, 6]]), max_new_tokens=8,
                                              prompt_lookup_num_tokens=3),
        "padded": lambda m: m.generate(padded, attention_mask=mask, max_new_tokens=6),
        "padded-static": lambda m: m.generate(padded, attention_mask=mask, max_new_tokens=6,
                                              cache_implementation="static"),
        "chunked-prefill": lambda m: m.generate(ids([list(range(3, 30))]), max_new_tokens=4,
                                                prefill_chunk_size=8),
        "return-sequences": lambda m: m.generate(ids(), max_new_tokens=6, do_sample=True,
                                                 num_return_sequences=3),
        "cache-reuse": reuse,
    }


@pytest.mark.parametrize("kind", ["neox", "llama"])
def test_every_decoding_mode_is_unchanged_and_clean(kind: str) -> None:
    """Each decoding mode gives the tokens it gives without cachescope, and no violation."""
    model = ATTRIBUTES[kind][1]()
    modes = _modes(kind)
    expected = {}
    for name, run in modes.items():
        torch.manual_seed(7)
        expected[name] = run(model).tolist()
    rec = _install()
    for name, run in modes.items():
        torch.manual_seed(7)
        assert run(model).tolist() == expected[name], name
        assert _found(rec) == [], (name, rec.report())
    view = rec.view(model)
    assert view is not None and view.stats.steps > 50 and view.stats.ops_by_op()["pop"] > 100
    assert rec.telemetry_errors == 0 and rec.measured_only == {}
    assert len(rec.views) == 2        # the model and its assistant
    assert "violations: none" in rec.report()


def test_sliding_window_layers_are_clean() -> None:
    """A sliding-window model (Mistral, window 4) decoding past its window: no violation."""
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                        sliding_window=4, eos_token_id=None, pad_token_id=0, bos_token_id=1,
                        initializer_range=0.5)
    model = MistralForCausalLM(cfg).eval()
    runs = [dict(max_new_tokens=10), dict(max_new_tokens=10, cache_implementation="static"),
            dict(max_new_tokens=8, num_beams=2)]
    expected = [model.generate(ids(), **kw).tolist() for kw in runs]
    rec = _install()
    assert [model.generate(ids(), **kw).tolist() for kw in runs] == expected
    assert _found(rec) == []


_OTHERS = {
    # alternating sliding-window and full-attention layers; masks by layer type
    "gemma2": dict(num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                   num_hidden_layers=4),
    # learned positions, no rotary
    "gpt2": dict(n_embd=32, n_layer=3, n_head=4, n_positions=256),
    # encoder-decoder: the decoder's caches live in an EncoderDecoderCache (measured only)
    "t5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0),
}


@pytest.mark.parametrize("model_type", sorted(_OTHERS))
def test_other_architectures_are_clean(model_type: str) -> None:
    """Other architectures, greedy / beam / static on a padded batch: same tokens, no violation."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM
    torch.manual_seed(0)
    options = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=256, eos_token_id=None,
                   pad_token_id=0, bos_token_id=1, initializer_range=0.5)
    cfg = AutoConfig.for_model(model_type, **{**options, **_OTHERS[model_type]})
    auto = AutoModelForSeq2SeqLM if model_type == "t5" else AutoModelForCausalLM
    model = auto.from_config(cfg).eval()
    prompt = ids([[0, 0, 7, 8, 9], [9, 8, 7, 6, 5]])
    runs = [dict(max_new_tokens=6), dict(max_new_tokens=5, num_beams=2),
            dict(max_new_tokens=6, cache_implementation="static")]
    kw = dict(attention_mask=(prompt != 0).long())
    expected = [model.generate(prompt, **kw, **run).tolist() for run in runs]
    rec = _install()
    assert [model.generate(prompt, **kw, **run).tolist() for run in runs] == expected
    assert _found(rec) == [] and rec.telemetry_errors == 0
    if model_type == "t5":
        assert set(rec.measured_only) == {"DynamicCache in EncoderDecoderCache",
                                          "StaticCache in EncoderDecoderCache"}
    else:
        assert rec.measured_only == {} and rec.view(model).stats.ops_by_op()["pop"] > 0


def test_manual_loop_without_watch_or_generate() -> None:
    """Forwards called directly are steps of the model found on the stack; owners are its modules."""
    model = neox()
    rec = _install()
    cache = DynamicCache(config=model.config)
    model(ids(), **{CACHE_KW: cache}, use_cache=True)
    for token in (3, 4, 5):
        model(torch.tensor([[token]]), **{CACHE_KW: cache}, use_cache=True)
    view = rec.view(model)
    assert view.stats.steps == 4 and _found(rec) == []
    owners = {r.owner for r in view.timeline() if r.op == "push"}
    assert owners == {"GPTNeoXAttention#0", "GPTNeoXAttention#1", "GPTNeoXAttention#2"}


# ------------------------------------------------------------------------- planted bugs
@pytest.mark.parametrize("kind", ["neox", "llama"])
def test_pruned_layer_is_layer_skipped(kind: str) -> None:
    """A layer removed without renumbering leaves its cache layer unwritten: layer_skipped, once."""
    model = ATTRIBUTES[kind][1](4)
    prune(model, 2)
    rec = _install()
    model.generate(ids(), max_new_tokens=5)
    assert _found(rec) == [("layer_skipped", 0, "layer_2")]
    v = rec.violations[0]
    assert "never written" in v.report() and "removed" in v.hint


@pytest.mark.parametrize("kind", ["neox", "llama"])
def test_duplicate_layer_idx(kind: str) -> None:
    """Two layers with one layer_idx: owner_mismatch naming both modules, layer_repeated, layer_skipped."""
    name, build = ATTRIBUTES[kind]
    model = build(3)
    dup_layer_idx(model, 0, 1)
    rec = _install()
    hf.watch(model)
    model.generate(ids(), max_new_tokens=4)
    found = _found(rec)
    assert found[:3] == [("owner_mismatch", 0, "layer_0"), ("layer_repeated", 0, "layer_0"),
                         ("layer_skipped", 0, "layer_1")]
    assert {f for f in found[3:]} <= {("owner_mismatch", s, "layer_0") for s in range(1, 4)}
    v = rec.violations[0]
    assert (v.consumer, v.producer) == (name.format(1), name.format(0))
    report = v.report()
    assert "Pop by   " + name.format(1) in report and "two modules extend the same layer" in report


@pytest.mark.parametrize("kind", ["neox", "llama"])
def test_layer_skipped_on_one_step(kind: str) -> None:
    """A layer skipped in step 2 only: layer_skipped at step 2, nothing after (the lag is explained)."""
    model = ATTRIBUTES[kind][1](3)
    rec = _install()
    with skip_layer_at(model, 1, 2):
        model.generate(ids(), max_new_tokens=6)
    assert _found(rec) == [("layer_skipped", 2, "layer_1")]


def test_crop_of_one_layer_mid_step() -> None:
    """Cropping one layer (in a forward) is structural_op_mid_step on that layer, once."""
    model = neox(3)
    rec = _install()
    with on_layer_at(model, 1, 2, lambda cache: cache.layers[1].crop(-1)):
        model.generate(ids(), max_new_tokens=5)
    assert _found(rec) == [("structural_op_mid_step", 2, "layer_1")]
    assert "crop() on layer 1 of the DynamicCache only" in rec.violations[0].detail


def test_cache_crop_during_a_forward() -> None:
    """A whole-cache crop between two layers of a forward is structural_op_mid_step on the cache."""
    model = llama(3)
    rec = _install()
    with on_layer_at(model, 1, 2, lambda cache: cache.crop(-1)):
        model.generate(ids(), max_new_tokens=5)
    assert _found(rec) == [("structural_op_mid_step", 2, "cache")]
    assert "layers 0 already updated" in rec.violations[0].detail


@pytest.mark.parametrize("kind", ["neox", "llama"])
def test_stale_reuse(kind: str) -> None:
    """A cache handed to a generation of another prompt is stale_reuse (digests only, no ids)."""
    model = ATTRIBUTES[kind][1](2)
    rec = _install()
    first = model.generate(ids(), max_new_tokens=4, return_dict_in_generate=True)
    steps = rec.view(model).step + 1
    other = [97, 98, 99, 100, 101, 102, 103, 104, 105, 106]
    model.generate(ids([other]), **{CACHE_KW: returned_cache(first)}, max_new_tokens=3)
    assert _found(rec) == [("stale_reuse", steps, "cache")]
    report = rec.violations[0].report()
    assert "8 token(s) per row" in report and "digests (never ids)" in report
    for token in other[:8]:
        assert f" {token}," not in report and f"[{token}" not in report


def test_prompt_shorter_than_the_cache_is_stale_reuse() -> None:
    """A prompt with fewer tokens than the cache holds is stale_reuse."""
    model = neox(2)
    rec = _install()
    first = model.generate(ids(), max_new_tokens=4, return_dict_in_generate=True)
    with pytest.raises(Exception):      # transformers itself cannot slice such a prompt
        model.generate(ids([[5, 6]]), **{CACHE_KW: returned_cache(first)}, max_new_tokens=2)
    assert _found(rec)[0][0] == "stale_reuse"
    assert "the prompt has only 2" in rec.violations[0].detail


@pytest.mark.parametrize("kind", ["neox", "llama"])
def test_wrong_positions_are_position_gap(kind: str) -> None:
    """A forward whose position_ids restart at 0 on a filled cache: one position_gap (layer 0)."""
    model = ATTRIBUTES[kind][1](3)
    rec = _install()
    cache = DynamicCache(config=model.config)
    model(ids(), **{CACHE_KW: cache}, use_cache=True)
    model(torch.tensor([[3]]), **{CACHE_KW: cache}, use_cache=True, position_ids=torch.tensor([[0]]))
    model(torch.tensor([[4]]), **{CACHE_KW: cache}, use_cache=True, position_ids=torch.tensor([[6]]))
    assert _found(rec) == [("position_gap", 1, "layer_0")]
    assert "holds 5 token(s) but the 1 new key(s) start at position row 0: 0" in rec.violations[0].detail


def test_one_layer_with_extra_tokens_is_seq_len_mismatch() -> None:
    """One layer stores an extra token: seq_len_mismatch on that layer, at that step, once."""
    model = neox(3)
    rec = _install()
    cache = DynamicCache(config=model.config)
    model(ids(), **{CACHE_KW: cache}, use_cache=True)
    extra_tokens_on(cache, 1)
    model(torch.tensor([[3]]), **{CACHE_KW: cache}, use_cache=True)
    del cache.update
    model(torch.tensor([[4]]), **{CACHE_KW: cache}, use_cache=True)
    assert _found(rec) == [("seq_len_mismatch", 1, "layer_1")]
    assert "layer 1: 7" in rec.violations[0].detail


def test_hook_makes_the_first_forward_a_checked_step() -> None:
    """``HFRecorder.hook(model)``: a loop that calls the model's forward itself gets its first
    forward checked as a whole step (found from the stack instead, it has no end-of-forward
    checks); ``unhook()`` takes the hooks off."""
    def first_forward_with_an_extra_token(hook: bool) -> list[tuple[str, int, str]]:
        model = neox(3)
        rec = _install()
        try:
            if hook:
                assert rec.hook(model, name="mine") is rec.view(model)
                assert list(rec.views) == ["mine"]
            cache = DynamicCache(config=model.config)
            extra_tokens_on(cache, 1)
            model(ids(), **{CACHE_KW: cache}, use_cache=True)
            return _found(rec)
        finally:
            hf.uninstall()

    assert first_forward_with_an_extra_token(False) == []
    assert first_forward_with_an_extra_token(True) == [("seq_len_mismatch", 0, "layer_1")]
    model = neox(2)
    rec = _install()
    rec.hook(model)
    assert len(model._forward_pre_hooks) == 1
    rec.unhook()
    assert len(model._forward_pre_hooks) == 0


def _layer_series(registry: Any) -> dict[tuple[str, str], float]:
    """``{(layer, attention): tokens}`` and ``{("skew", ""): tokens}`` of the hf view."""
    out = {}
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "cachescope_layer_kv_tokens":
                out[(sample.labels["layer"], sample.labels["attention"])] = sample.value
            elif sample.name == "cachescope_layer_kv_skew_tokens":
                out[("skew", "")] = sample.value
    return out


def test_per_layer_kv_length_metrics() -> None:
    """cachescope_layer_kv_tokens: every layer's length after the last forward (0 skew on a
    correct run; the report says the same); a layer that stores an extra token shows it, and the
    skew; the series leave the registry with the recorder, and a new install exports there again."""
    registry = CollectorRegistry()
    model = neox(3)
    rec = _install(registry=registry)
    model.generate(ids(), max_new_tokens=4)
    n = ids().shape[1] + 3          # the last forward's cache: prompt + 3 generated tokens
    assert _layer_series(registry) == {**{(str(i), "full"): n for i in range(3)}, ("skew", ""): 0}
    assert f"KV tokens per layer after the last forward: 3 full-attention layer(s) x {n} (skew 0)" \
        in rec.report()
    cache = DynamicCache(config=model.config)
    model(ids(), **{CACHE_KW: cache}, use_cache=True)
    extra_tokens_on(cache, 1)
    model(torch.tensor([[3]]), **{CACHE_KW: cache}, use_cache=True)
    p = ids().shape[1]
    assert _layer_series(registry) == {("0", "full"): p + 1, ("1", "full"): p + 2,
                                       ("2", "full"): p + 1, ("skew", ""): 1}
    assert (f"full-attention layers 0: {p + 1}, 1: {p + 2}, 2: {p + 1} (skew 1)"
            in rec.report())
    hf.uninstall()
    rec.close()
    assert _layer_series(registry) == {}
    _install(registry=registry)
    model.generate(ids(), max_new_tokens=2)
    assert _layer_series(registry)[("skew", "")] == 0


def test_per_layer_metrics_sliding_layers_and_the_layer_label_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sliding-window layers are labelled attention="sliding" (tokens ever added); layers past
    MAX_LAYER_LABELS share layer="other" (the longest), so the label stays bounded."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    from cachescope.hf import _metrics
    monkeypatch.setattr(_metrics, "MAX_LAYER_LABELS", 3)
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                       **_OTHERS["gemma2"], eos_token_id=None, pad_token_id=0)
    model = Gemma2ForCausalLM(cfg).eval()
    registry = CollectorRegistry()
    _install(registry=registry)
    model.generate(ids(), max_new_tokens=6)
    series = _layer_series(registry)
    n = ids().shape[1] + 5
    kinds = ["sliding" if t == "sliding_attention" else "full" for t in cfg.layer_types]
    assert set(kinds) == {"sliding", "full"}
    expected = {(str(i), k): n for i, k in enumerate(kinds[:3])}
    expected[("other", kinds[3])] = n
    assert series == {**expected, ("skew", ""): 0}


def test_strict_mode_raises_a_pop_order_error() -> None:
    """strict=True raises HFCacheError, a PopOrderError, at the first violation."""
    model = neox(3)
    dup_layer_idx(model, 0, 1)
    _install(strict=True)
    with pytest.raises(hf.HFCacheError) as info:
        model.generate(ids(), max_new_tokens=4)
    assert isinstance(info.value, PopOrderError)
    assert (info.value.violation.kind, info.value.violation.step) == ("owner_mismatch", 0)


def _view_ops(rec: Any) -> list[tuple[int, str, str, str | None, str | None]]:
    (view,) = rec.views.values()
    return [(r.step, r.op, r.queue, r.owner, r.violation) for r in view.timeline()]


@pytest.mark.parametrize("fault", [None, "dup"])
def test_view_ops_applied_at_the_forwards_end_equal_ops_made_at_each_update(fault: str | None) -> None:
    """The view's ops of a forward are applied when it ends (default mode); strict mode applies
    each at its update. Both give the same ops, in the order of the updates, with the same owners
    and owner_mismatch verdicts."""
    runs = []
    for strict in (False, True):
        hf.uninstall()
        model = neox(3)
        if fault:
            dup_layer_idx(model, 0, 1)
        rec = _install(strict=strict, timeline_size=4096)
        hf.watch(model)
        try:
            model.generate(ids(), max_new_tokens=3)
        except hf.HFCacheError:
            pass
        runs.append(_view_ops(rec))
    deferred, immediate = runs
    assert deferred[:len(immediate)] == immediate
    updates = [(op, q, owner) for _, op, q, owner, _ in deferred if op in ("pop", "push")]
    if fault is None:
        assert updates[:3] == [("push", f"layer_{i}", f"gpt_neox.layers.{i}.attention") for i in range(3)]
        assert updates[3:9] == [(op, f"layer_{i}", f"gpt_neox.layers.{i}.attention")
                                for i in range(3) for op in ("pop", "push")]
    else:
        assert ("pop", "layer_0", "gpt_neox.layers.1.attention") in updates
        assert any(v == "owner_mismatch" for *_, v in immediate)


def test_models_generating_on_several_threads_are_checked_apart() -> None:
    """Two models generating at once on two threads (one of them with a duplicated layer_idx):
    each has its own view, the clean one no violation and its tokens unchanged, the faulty one
    its owner_mismatch; each view counts its own forwards."""
    import threading
    clean, faulty = neox(3), llama(3)
    dup_layer_idx(faulty, 0, 1)
    expected = clean.generate(ids(), max_new_tokens=12).tolist()
    rec = _install()
    hf.watch(clean, name="clean")
    hf.watch(faulty, name="faulty")
    got: dict[str, Any] = {}
    errors: list[BaseException] = []

    def run(name: str, model: Any) -> None:
        try:
            for _ in range(3):
                got[name] = model.generate(ids(), max_new_tokens=12).tolist()
        except BaseException as exc:     # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=a) for a in (("clean", clean), ("faulty", faulty))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and got["clean"] == expected
    assert {v.cache for v in rec.violations} == {"faulty"}
    assert ("owner_mismatch", 0, "layer_0") in _found(rec)
    assert rec.views["clean"].stats.steps == rec.views["faulty"].stats.steps == 3 * 12


def test_record_and_analyze_a_llama_view_through_the_api(tmp_path: Any) -> None:
    """cachescope.record on a Llama model's view, analyze_file on the file: the replay finds the
    live run's violations (kind, step, layer, owners), with the HF-only ones carried through."""
    from cachescope.analyze import analyze_file
    from cachescope.record import Recorder
    model = llama(3)
    dup_layer_idx(model, 1, 2)
    rec = _install()
    hf.watch(model, name="llama")
    path = tmp_path / "llama.jsonl"
    with Recorder(path, run_info={"model": "llama"}) as recorder:
        recorder.attach(rec.view(model))
        model.generate(ids(), max_new_tokens=5)
    live = [(v.kind, v.step, v.queue, v.consumer, v.producer) for v in rec.violations]
    replayed = analyze_file(path, out=None)
    assert [(v.kind, v.step, v.queue, v.consumer, v.producer) for v in replayed.violations] == live
    assert {"owner_mismatch", "layer_repeated", "layer_skipped"} <= {k for k, *_ in live}


# ------------------------------------------------------------------------- install / uninstall
_PATCHED = [(cache_utils.Cache, name) for name in ("update", "crop", "reorder_cache",
                                                   "batch_select_indices",
                                                   "batch_repeat_interleave", "reset")]
# The layers' own crop(): install() patches each layer class's own, and StaticLayer has one only
# from transformers 5.24 (test_install_and_uninstall_are_idempotent_round_trips requires it there).
_PATCHED += [(cls, "crop") for cls in (cache_utils.DynamicLayer, cache_utils.StaticLayer)
             if cls is cache_utils.DynamicLayer or "crop" in cls.__dict__]
_PATCHED += [(GenerationMixin, "generate")]


def test_install_and_uninstall_are_idempotent_round_trips() -> None:
    """install() twice gives one recorder; uninstall() restores the exact functions and hooks."""
    assert ((cache_utils.StaticLayer, "crop") in _PATCHED) == (TRANSFORMERS >= (5, 24))
    before = {(cls, name): cls.__dict__[name] for cls, name in _PATCHED}
    model = neox(2)
    attn = model.gpt_neox.layers[0].attention
    hooks = [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in (model, attn)]
    rec = _install()
    assert hf.install() is rec and hf.installed() is rec
    hf.watch(model)
    assert all(cls.__dict__[name] is not before[(cls, name)] for cls, name in _PATCHED)
    model.generate(ids(), max_new_tokens=2)
    assert len(model._forward_pre_hooks) == len(hooks[0][0]) + 1
    assert len(attn._forward_pre_hooks) == len(hooks[1][0]) + 1
    hf.uninstall()
    hf.uninstall()
    assert hf.installed() is None
    assert all(cls.__dict__[name] is before[(cls, name)] for cls, name in _PATCHED)
    assert [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in (model, attn)] == hooks
    steps = rec.view(model).stats.steps
    model.generate(ids(), max_new_tokens=2)            # nothing reports any more
    assert rec.view(model).stats.steps == steps


def test_install_without_transformers_says_what_to_install() -> None:
    """Without transformers, import cachescope.hf works and install() raises a one-line ImportError."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import cachescope.hf as hf\n"
            "try:\n    hf.install()\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("ERR cachescope.hf needs Hugging Face transformers>=")
    assert "pip install 'transformers>=" in line and "\n" not in line


@pytest.mark.parametrize("version", ["5.4.1", "4.57.6"])
def test_install_refuses_transformers_older_than_supported(monkeypatch: pytest.MonkeyPatch,
                                                           version: str) -> None:
    """A transformers older than MIN_TRANSFORMERS: install() raises the one-line ImportError
    naming the version found, and patches nothing."""
    # the module install() imports (an in-process pytester run may have imported it anew)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    before = cache_utils.Cache.__dict__["update"]
    with pytest.raises(ImportError, match=rf"transformers>={hf.MIN_TRANSFORMERS}.*found transformers {version}"):
        hf.install()
    assert hf.installed() is None and cache_utils.Cache.__dict__["update"] is before


def test_paused_sees_nothing_and_checking_resumes_after() -> None:
    """Inside cachescope.hf.paused() a faulty model runs unseen (no op, step or violation in any
    view; same tokens); after the block the same model is checked again."""
    model = neox(3)
    dup_layer_idx(model, 0, 1)
    rec = _install()
    with hf.paused():
        tokens = model.generate(ids(), max_new_tokens=3).tolist()
    assert rec.violations == [] and all(v.stats.steps == 0 and not v.timeline()
                                        for v in rec.views.values())
    assert model.generate(ids(), max_new_tokens=3).tolist() == tokens
    assert ("owner_mismatch", 0, "layer_0") in _found(rec)
    hf.uninstall()
    with hf.paused():                 # not installed: nothing to pause
        assert model.generate(ids(), max_new_tokens=3).tolist() == tokens


def test_unknown_cache_class_is_measured_only(caplog: pytest.LogCaptureFixture) -> None:
    """A Cache subclass cachescope does not know: same tokens, counted, said once, never checked."""
    class MyCache(DynamicCache):
        pass

    model = neox(2)
    expected = model.generate(ids(), **{CACHE_KW: MyCache(config=model.config)},
                              max_new_tokens=4).tolist()
    rec = _install()
    with caplog.at_level(logging.WARNING, logger="cachescope"):
        for _ in range(2):
            got = model.generate(ids(), **{CACHE_KW: MyCache(config=model.config)},
                                 max_new_tokens=4)
            assert got.tolist() == expected
    assert _found(rec) == [] and rec.measured_only == {"MyCache": 16}
    said = [r for r in caplog.records if "MyCache" in r.getMessage()]
    assert len(said) == 1 and "measured only" in said[0].getMessage()
    assert "MyCache: 16 update(s)" in rec.report()


# ------------------------------------------------------------------------- telemetry
def test_metrics_and_traces_of_a_run() -> None:
    """Violations, ops and steps reach Prometheus; generate and decode_step spans, the bad step ERROR."""
    registry = CollectorRegistry()
    provider, exporter = otel_memory()
    model = neox(4)
    prune(model, 2)
    rec = _install(registry=registry, tracing=True, tracer_provider=provider)
    model.generate(ids(), max_new_tokens=4)
    labels = {"cache": "hf", "family": "layer"}
    assert registry.get_sample_value("cachescope_violations_total",
                                     {**labels, "kind": "layer_skipped"}) == 1
    assert registry.get_sample_value("cachescope_violations_total",
                                     {**labels, "kind": "stale_reuse"}) == 0
    assert registry.get_sample_value("cachescope_decode_steps_total", {"cache": "hf"}) == 4
    assert registry.get_sample_value("cachescope_ops_total", {**labels, "op": "push"}) == 12
    assert registry.get_sample_value("cachescope_tensor_bytes", {**labels, "kind": "logical"}) == 0
    spans = exporter.get_finished_spans()
    steps = [s for s in spans if s.name == "decode_step"]
    assert [s.name for s in spans].count("generate") == 1 and len(steps) == 4
    assert steps[0].status.status_code.name == "ERROR"
    assert steps[0].events[-1].attributes["cachescope.violation.kind"] == "layer_skipped"
    assert all(s.status.status_code.name != "ERROR" for s in steps[1:])
    assert rec.views["hf"] is rec.view(model)


def test_bytes_follow_the_layers_without_holding_them() -> None:
    """Bytes held are the live cache's; dropping the cache frees its tensors."""
    registry = CollectorRegistry()
    model = neox(2)
    _install(registry=registry)
    out = model.generate(ids(), max_new_tokens=4, return_dict_in_generate=True)
    cache = returned_cache(out)
    keys = weakref.ref(cache.layers[0].keys)
    nbytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    labels = {"cache": "hf", "family": "layer", "kind": "logical"}
    assert registry.get_sample_value("cachescope_tensor_bytes", labels) == nbytes
    del out, cache
    gc.collect()
    assert keys() is None
    assert registry.get_sample_value("cachescope_tensor_bytes", labels) == 0


def test_cachescope_failures_never_reach_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure inside cachescope is counted and logged; tokens and the model's errors are unchanged."""
    from cachescope.hf import _recorder

    model = neox(3)
    expected = model.generate(ids(), max_new_tokens=4).tolist()
    small = DynamicCache(config=neox(2).config)
    with pytest.raises(Exception) as plain:
        model(ids(), **{CACHE_KW: small}, use_cache=True)
    rec = _install()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("cachescope bug")

    monkeypatch.setattr(_recorder.HFRecorder, "_on_update", broken)
    monkeypatch.setattr(_recorder.HFRecorder, "_end_forward", broken)
    assert model.generate(ids(), max_new_tokens=4).tolist() == expected
    assert rec.telemetry_errors > 0
    with pytest.raises(type(plain.value)) as instrumented:
        model(ids(), **{CACHE_KW: DynamicCache(config=neox(2).config)}, use_cache=True)
    assert str(instrumented.value) == str(plain.value)


def test_the_one_pass_forward_applies_what_the_per_update_path_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A clean decode forward is checked and applied in one pass (``_flush_fast``); the view's ops
    (order, queues, owners, steps) and the verdicts equal those of the per-update path."""
    from cachescope.hf import _recorder

    calls: list[bool] = []
    original = _recorder.HFRecorder._flush_fast

    def counted(self: Any, ctx: Any, pending: Any) -> bool:
        calls.append(original(self, ctx, pending))
        return calls[-1]

    def run() -> list[tuple[Any, ...]]:
        model = neox(3)
        rec = _install()
        try:
            model.generate(ids(), max_new_tokens=6)
            (view,) = rec.views.values()
            assert rec.violations == []
            return [(r.step, r.op, r.queue, r.owner, r.depth) for r in view.timeline()
                    if r.op in ("push", "pop")]
        finally:
            hf.uninstall()

    with monkeypatch.context() as m:
        m.setattr(_recorder.HFRecorder, "_flush_fast", lambda *a: False)
        per_update = run()
    monkeypatch.setattr(_recorder.HFRecorder, "_flush_fast", counted)
    assert run() == per_update
    assert calls.count(True) == 5       # the 5 decode forwards (the prompt's: per update)


def test_a_failing_one_pass_check_falls_back_to_the_per_update_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An internal failure in the one-pass check is counted and logged once; the forward is then
    checked update by update (every op applied, no violation made up), tokens unchanged; a
    failure applying the ops is counted and no end-of-forward verdict is made from them."""
    from cachescope.hf import _recorder

    model = neox(3)
    expected = model.generate(ids(), max_new_tokens=4).tolist()
    rec = _install()

    def broken(self: Any, ctx: Any, pending: Any) -> bool:
        raise RuntimeError("cachescope bug")

    monkeypatch.setattr(_recorder.HFRecorder, "_flush_fast", broken)
    assert model.generate(ids(), max_new_tokens=4).tolist() == expected
    assert rec.telemetry_errors == 4 and rec.violations == []    # the prompt's forward too
    (view,) = rec.views.values()
    pushes = {(r.step, r.queue) for r in view.timeline() if r.op == "push"}
    assert {(s, f"layer_{i}") for s in (1, 2, 3) for i in range(3)} <= pushes
    monkeypatch.undo()

    def failing_apply(self: Any, ops: Any) -> None:
        raise RuntimeError("cachescope bug")

    monkeypatch.setattr(InstrumentedCache, "pop_push_many", failing_apply)
    errors = rec.telemetry_errors
    assert model.generate(ids(), max_new_tokens=4).tolist() == expected
    assert rec.telemetry_errors == errors + 3 and rec.violations == []


def test_a_failing_update_check_leaves_the_others_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """An internal failure while checking one noted update is counted and logged once; the
    forward's other updates are still checked and applied, no violation is made up from the
    missing one, and tokens are unchanged."""
    from cachescope.hf import _recorder

    model = neox(3)
    expected = model.generate(ids(), max_new_tokens=4).tolist()
    rec = _install()
    original = _recorder.HFRecorder._update

    def flaky(self: Any, ctx: Any, view: Any, st: Any, cache: Any, idx: int, *rest: Any) -> None:
        if idx == 1 and ctx is not None and ctx.step >= 1:
            raise RuntimeError("cachescope bug")
        original(self, ctx, view, st, cache, idx, *rest)

    monkeypatch.setattr(_recorder.HFRecorder, "_update", flaky)
    # (the per-update path: a forward that fails the one-pass check is checked update by update)
    monkeypatch.setattr(_recorder.HFRecorder, "_flush_fast", lambda *a: False)
    assert model.generate(ids(), max_new_tokens=4).tolist() == expected
    assert rec.telemetry_errors == 3          # layer 1 in each of the 3 decode steps
    (view,) = rec.views.values()
    pushes = {(r.step, r.queue) for r in view.timeline() if r.op == "push"}
    assert {(s, q) for s in (1, 2, 3) for q in ("layer_0", "layer_2")} <= pushes
    assert not any(q == "layer_1" and s >= 1 for s, q in pushes)
    assert rec.violations == []


def test_docs_example_prints_what_the_docs_say(capsys: pytest.CaptureFixture[str]) -> None:
    """The first example of docs/hf.md finds the three violations it shows, with that report."""
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "docs" / "hf.md").read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(block, "docs/hf.md", "exec"), {"__name__": "docs"})
    out = capsys.readouterr().out
    assert ("[('owner_mismatch', 0, 'layer_0'), ('layer_repeated', 0, 'layer_0'), "
            "('layer_skipped', 0, 'layer_1')]") in out
    assert "Pop by   gpt_neox.layers.1.attention at step 0" in out
    assert "Hint: two modules extend the same layer of the cache" in out


_INNER = """
import cachescope.hf as hf
from _hf_models import ids, neox, prune

def test_pruned_model():
    model = neox(4)
    prune(model, 2)
    hf.install()
    try:
        model.generate(ids(), max_new_tokens=3)
    finally:
        hf.uninstall()
"""


def test_pytest_plugin_strict_mode_fails_on_hf_violations(pytester: pytest.Pytester) -> None:
    """The pytest plugin's strict mode fails a test whose Hugging Face caches broke a rule."""
    from pathlib import Path
    pytester.makepyfile(_hf_models=(Path(__file__).parent / "_hf_models.py").read_text(),
                        test_inner=_INNER)
    plugin = [] if plugin_autoloaded() else ["-p", "cachescope.pytest_plugin"]
    fast = ["-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:anyio"]
    pytester.runpytest_inprocess(*plugin, *fast).assert_outcomes(passed=1)
    strict = pytester.runpytest_inprocess(*plugin, *fast, "--cachescope-strict")
    strict.assert_outcomes(failed=1)
    out = strict.stdout.str()
    assert "(cache 'hf': layer_skipped x1)" in out
    assert "layer_skipped on queue 'layer_2' (family layer) at step 0" in out
