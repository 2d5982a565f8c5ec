"""Step boundaries: restarts, repeats and harmless re-sets of state_ids."""

from __future__ import annotations

import pytest
from torch import nn

from cachescope import InstrumentedCache, watch
from cachescope.faults import inject
from cachescope.neox import NeoXModel, generate

from _kvloop import KVLayer
from _loop import tiny_model


@pytest.fixture(scope="module")
def model() -> NeoXModel:
    return tiny_model()


def _kinds(cache: InstrumentedCache) -> list[tuple[str, int]]:
    return [(v.kind, v.step) for v in cache.violations]


def test_retry_of_the_prompt_step_is_a_restart(model: NeoXModel) -> None:
    """A prompt step that raised half-way and is retried is step_restarted, not state_not_advanced."""
    cache = InstrumentedCache(metrics=False, tracing=False)
    with watch(model, cache):
        with inject("retry@0:layer=2", model.layers, cache, model=model):
            generate(model, [1, 2, 3], 4, cache=cache)
    assert _kinds(cache)[0] == ("step_restarted", 1)
    assert "state_not_advanced" not in {k for k, _ in _kinds(cache)}


def test_setting_state_ids_twice_before_any_layer_runs_is_harmless() -> None:
    """Re-setting the same state_ids when no op ran under them records no violation."""
    cache = InstrumentedCache(metrics=False, tracing=False)
    cache.set("state_ids", (None, 0))
    cache.set("state_ids", (None, 0))
    cache.mark_step(None, 0)
    assert cache.violations == []


def test_completed_step_set_again_is_state_not_advanced() -> None:
    """A step that pushed and completed, then gets the same state_ids again, is state_not_advanced."""
    cache = InstrumentedCache(metrics=False, tracing=False)
    layers = nn.Sequential(KVLayer(cache), KVLayer(cache))
    import torch
    x = torch.zeros(1, 1, 2)
    cache.set("state_ids", (None, 0))
    layers(x)
    cache.set("state_ids", (0, 1))
    layers(x)
    cache.set("state_ids", (0, 1))
    assert _kinds(cache) == [("state_not_advanced", 2)]
    with pytest.raises(IndexError):
        layers(x)
    assert _kinds(cache)[-1] == ("pop_empty", 2)


def test_unnamed_caches_get_distinct_names_while_alive() -> None:
    """Two unnamed caches alive at once export as 'default' and 'default-2'; an explicit clash raises."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    a = InstrumentedCache(registry=reg, tracing=False)
    b = InstrumentedCache(registry=reg, tracing=False)
    assert (a.name, b.name) == ("default", "default-2")
    with pytest.raises(ValueError, match="already exported"):
        InstrumentedCache(name="default", registry=reg, tracing=False)
    a.push("attn_kv_0", 1)
    b.push("attn_kv_0", 1)
    assert reg.get_sample_value(
        "cachescope_ops_total", {"cache": "default-2", "op": "push", "family": "attn_kv"}) == 1
