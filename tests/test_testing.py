"""Tests for cachescope.testing: capture(), CacheProbe and its assertion helpers."""

from __future__ import annotations

import prometheus_client
import pytest
import torch

import cachescope
from cachescope import InstrumentedCache, _cache
from cachescope.neox import NeoXModel
from cachescope.testing import CacheProbe, Op, capture

from _kvloop import KVLayer
from _loop import tiny_model

LAYERS = [f"layers.{i}.attention" for i in range(4)]


def _swap_after_first_step(model: NeoXModel):
    """on_step callback: swap layers 1 and 2 after step 0 (restored by the caller)."""
    def on_step(i: int, _token: int) -> None:
        if i == 0:
            model.layers[1], model.layers[2] = model.layers[2], model.layers[1]
    return on_step


def _decode_swapped(probe: CacheProbe, n: int = 3) -> None:
    model = tiny_model()
    original = list(model.layers)
    try:
        probe.decode(model, [1, 2, 3], n, on_step=_swap_after_first_step(model))
    finally:
        for i, layer in enumerate(original):
            model.layers[i] = layer


@pytest.fixture(autouse=True)
def _no_singleton_leak():
    """Every test starts and ends with nothing installed."""
    assert cachescope.installed() is None
    yield
    assert cachescope.installed() is None


def _assertion_text(fn, *args, **kwargs) -> str:
    with pytest.raises(AssertionError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- install / restore
def test_capture_installs_and_restores_singleton() -> None:
    """capture() makes its cache the singleton for the block and puts the old one back after it."""
    before = _cache.get_cache()
    with capture() as probe:
        assert cachescope.installed() is probe.cache
        assert cachescope.get_cache() is probe.cache
    assert cachescope.installed() is None
    assert _cache.get_cache() is before


def test_capture_restores_on_exception() -> None:
    """The singleton is restored even when the block raises."""
    before = _cache.get_cache()
    with pytest.raises(ZeroDivisionError):
        with capture():
            1 / 0
    assert cachescope.installed() is None
    assert _cache.get_cache() is before


def test_capture_sets_aside_and_reinstalls_previous_cache() -> None:
    """A cache installed before the block is reinstalled after it, also on errors."""
    outer = cachescope.install(InstrumentedCache(name="outer", metrics=False, tracing=False))
    try:
        with pytest.raises(RuntimeError):
            with capture() as probe:
                assert cachescope.get_cache() is probe.cache
                raise RuntimeError("boom")
        assert cachescope.installed() is outer
        assert cachescope.get_cache() is outer
    finally:
        cachescope.uninstall()


def test_nested_captures_restore_in_order() -> None:
    """Nested captures each see their own cache and unwind to the right one."""
    with capture(name="a") as a:
        with capture(name="b") as b:
            assert cachescope.installed() is b.cache
        assert cachescope.installed() is a.cache
    assert cachescope.installed() is None


def test_watch_hooks_removed_on_exit() -> None:
    """probe.watch() names owners after the model and its hooks go away with the probe."""
    model = tiny_model()
    with capture() as probe:
        handle = probe.watch(model)
        assert handle.active and "layers.0.attention" in handle.hooked
        probe.decode(model, [1, 2, 3], 2)
    assert not handle.active
    assert {o.owner for o in probe.ops if o.op == "push"} == set(LAYERS)


# --------------------------------------------------------------------------- recording
def test_ops_log_records_every_op_beyond_the_timeline() -> None:
    """probe.ops keeps every op (the cache's timeline is a short ring) as Op tuples."""
    with capture(timeline_size=4) as probe:
        probe.watch(tiny_model())
        probe.decode(tiny_model(), [1, 2, 3], 5)
    pushes = [o for o in probe.ops if o.op == "push"]
    assert len(pushes) == 20 and len(probe.cache.timeline()) == 4
    first_pop = next(o for o in probe.ops if o.op == "pop")
    assert isinstance(first_pop, Op)
    assert (first_pop.step, first_pop.queue, first_pop.family) == (1, "attn_kv_0", "attn_kv")
    assert first_pop.owner == first_pop.producer == "layers.0.attention"


def test_ops_log_is_capped() -> None:
    """max_ops bounds the op log; the overflow is counted and named in pop-order failures."""
    with capture(max_ops=10) as probe:
        probe.decode(tiny_model(), [1, 2, 3], 4)
    assert len(probe.ops) == 10
    assert probe._log.dropped > 0


def test_metrics_go_to_the_probe_registry_only() -> None:
    """The probe's metrics land in its own registry, never in prometheus_client.REGISTRY."""
    with capture() as probe:
        probe.decode(tiny_model(), [1, 2, 3], 3)
    assert probe.sample("cachescope_ops_total", {"op": "push", "family": "attn_kv"}) == 12
    assert probe.sample("cachescope_decode_steps_total") == 3
    global_names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(name.startswith("cachescope") for name in global_names)


def test_two_probes_with_the_same_name_do_not_clash() -> None:
    """Each probe has its own registry, so equal cache names are fine."""
    a, b = CacheProbe(name="same"), CacheProbe(name="same")
    a.decode(tiny_model(), [1], 2)
    assert a.sample("cachescope_decode_steps_total") == 2
    assert b.sample("cachescope_decode_steps_total") == 0


def test_spans_are_captured_in_memory() -> None:
    """With opentelemetry-sdk installed, spans go to the probe's in-memory exporter."""
    pytest.importorskip("opentelemetry.sdk")
    with capture() as probe:
        probe.decode(tiny_model(), [1, 2, 3], 3)
    assert len(probe.spans("decode_step")) == 3
    assert len(probe.spans("generate")) == 1


def test_spans_raise_when_tracing_is_off() -> None:
    """spans() explains why there are none instead of returning an empty list."""
    with capture(tracing=False) as probe:
        pass
    with pytest.raises(RuntimeError, match="tracing is off"):
        probe.spans()


# --------------------------------------------------------------------------- assertions
def test_assertions_pass_on_a_correct_decode() -> None:
    """Every helper passes on the reference model's correct decode loop."""
    with capture() as probe:
        probe.watch(tiny_model())
        probe.decode(tiny_model(), [1, 2, 3], 5)
    probe.assert_no_violations()
    probe.assert_drained()
    probe.assert_op_counts(push=20, pop=16, family="attn_kv")
    probe.assert_max_depth("attn_kv", 4)
    probe.assert_max_bytes("attn_kv", 1 << 20)
    probe.assert_max_bytes("attn_kv", 1 << 20, kind="logical")
    probe.assert_pop_order("attn_kv_0", LAYERS)
    probe.assert_pop_order("attn_kv", LAYERS * 4)


def test_assert_no_violations_shows_the_reports() -> None:
    """The failure message holds the violation report: both owners, the kind and the hint."""
    with capture() as probe:
        probe.watch(tiny_model())
        _decode_swapped(probe)
    text = _assertion_text(probe.assert_no_violations)
    assert "recorded 2 pop-order violation(s) (owner_mismatch x2)" in text
    assert "cachescope: owner_mismatch on queue 'attn_kv_0'" in text
    assert "Pop by   layers.2.attention" in text
    assert "Push by  layers.1.attention" in text
    assert "Hint:" in text


def test_assert_no_violations_limits_full_reports() -> None:
    """Past max_reports, violations get one summary line each."""
    with capture() as probe:
        probe.watch(tiny_model())
        _decode_swapped(probe)
    text = _assertion_text(probe.assert_no_violations, max_reports=1)
    assert text.count("Hint:") == 1
    assert "... and 1 more:" in text


def test_expect_violations_declares_them_expected() -> None:
    """Violations inside expect_violations() are returned and no longer fail assert_no_violations."""
    with capture() as probe:
        probe.watch(tiny_model())
        with probe.expect_violations("owner_mismatch") as caught:
            _decode_swapped(probe)
    assert [(v.consumer, v.producer) for v in caught[:2]] == [
        ("layers.2.attention", "layers.1.attention"), ("layers.1.attention", "layers.2.attention")]
    probe.assert_no_violations()
    assert len(probe.violations) == 2 and probe.unexpected_violations == []


def test_expect_violations_fails_when_nothing_happens() -> None:
    """A block that was expected to provoke a violation but did not fails with the reason."""
    with capture() as probe:
        with pytest.raises(AssertionError, match="expected violations of kind pop_empty"):
            with probe.expect_violations("pop_empty"):
                probe.decode(tiny_model(), [1], 2)
        with pytest.raises(ValueError, match="unknown violation kind"):
            with probe.expect_violations("nonsense"):
                pass


def test_assert_drained_names_what_is_left() -> None:
    """A queue left filled is named with its depth and who pushed it; ignore= skips it."""
    with capture() as probe:
        probe.watch(tiny_model())
        probe.decode(tiny_model(), [1, 2, 3], 3, cleanup=False)
    text = _assertion_text(probe.assert_drained)
    assert "1 queue(s) still hold items" in text
    assert "'attn_kv_2': depth 4, pushed by " + ", ".join(LAYERS) + " at step 2" in text
    probe.assert_drained(ignore=["attn_kv_2"])
    probe.assert_drained(ignore="attn_kv_*")
    probe.assert_drained(ignore="attn_kv")


def test_assert_op_counts_lists_each_mismatch() -> None:
    """Wrong counts are listed op by op; bad keywords are a TypeError."""
    with capture() as probe:
        probe.decode(tiny_model(), [1, 2, 3], 2)
    text = _assertion_text(probe.assert_op_counts, push=9, pop=4)
    assert "push: expected 9, got 8" in text and "pop: expected 4, got 4  (ok)" in text
    with pytest.raises(TypeError):
        probe.assert_op_counts(pushes=1)


def test_assert_max_depth_and_bytes_report_the_peak() -> None:
    """Depth and byte limits report the peak and the limit; unknown families fail clearly."""
    with capture() as probe:
        probe.decode(tiny_model(), [1, 2, 3], 2)
    assert "peaked at 4 item(s) held at once, above the limit of 3" in _assertion_text(
        probe.assert_max_depth, "attn_kv", 3)
    assert "above the limit of 100 B (100 bytes)" in _assertion_text(
        probe.assert_max_bytes, "attn_kv", 100)
    assert "never saw queue family 'attn'" in _assertion_text(probe.assert_max_depth, "attn", 3)
    with pytest.raises(ValueError):
        probe.assert_max_bytes("attn_kv", 1, kind="nbytes")


def test_assert_pop_order_shows_the_difference() -> None:
    """A wrong pop order is reported at the first differing pop, with who pushed each item."""
    with capture() as probe:
        probe.watch(tiny_model())
        _decode_swapped(probe)
    probe.assert_pop_order("attn_kv_0", ["layers.0.attention", "layers.2.attention",
                                         "layers.1.attention", "layers.3.attention"])
    text = _assertion_text(probe.assert_pop_order, "attn_kv_0", LAYERS)
    assert "differ from the expected owners at pop #2" in text
    assert "layers.2.attention <- layers.1.attention  <-- owner_mismatch" in text
    assert "logged no pop" in _assertion_text(probe.assert_pop_order, "nope", LAYERS)


def test_probe_works_with_a_plain_module_loop() -> None:
    """A hand-written loop through the installed singleton is seen by the probe."""
    model = torch.nn.Sequential(*[KVLayer(prefix="kv_", kv=lambda x: x) for _ in range(3)])
    with capture() as probe:
        probe.watch(model)
        cache = cachescope.get_cache()
        for state in [(None, 0), (0, 1), (1, 2)]:
            cache.set("state_ids", state)
            model(torch.zeros(2))
    probe.assert_no_violations()
    probe.assert_pop_order("kv_1", ["0", "1", "2"])
    probe.assert_drained(ignore="kv_2")
