"""cachescope.hf.inject_faults: each named fault on tiny random GPT-NeoX and Llama models is
reported by cachescope.hf with its kind, step and layer, and the model is restored on exit."""

from __future__ import annotations

from typing import Any, Callable

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import cachescope.hf as hf  # noqa: E402
from _hf_models import attention, decoder_layers, ids, llama, neox  # noqa: E402

BUILD: dict[str, Callable[..., Any]] = {"neox": neox, "llama": llama}
OTHER = [97, 98, 99, 100, 101, 102, 103, 104, 105, 106]


@pytest.fixture(autouse=True)
def _uninstalled() -> Any:
    """Every test starts and ends with cachescope.hf uninstalled."""
    hf.uninstall()
    yield
    hf.uninstall()


def _found(rec: Any) -> list[tuple[str, int, str]]:
    return [(v.kind, v.step, v.queue) for v in rec.violations]


_CLEAN: dict[tuple[str, int], list[list[int]]] = {}


def _clean(model: Any, new: int) -> list[list[int]]:
    """The tokens of the unfaulted model (the same for every model built with the same seed)."""
    key = (type(model).__name__, len(decoder_layers(model)), new)
    if key not in _CLEAN:
        _CLEAN[key] = model.generate(ids(), max_new_tokens=new).tolist()
    return _CLEAN[key]


def _run(model: Any, spec: str, new: int = 5) -> tuple[Any, Any]:
    """generate() under ``spec``, checked; then the model gives its clean tokens again."""
    clean = _clean(model, new)
    rec = hf.install(metrics=False, tracing=False)
    with hf.inject_faults(spec, model) as handle:
        model.generate(ids(), max_new_tokens=new)
    hf.uninstall()
    assert model.generate(ids(), max_new_tokens=new).tolist() == clean
    assert handle.not_fired() == []
    return rec, handle


@pytest.mark.parametrize("kind", sorted(BUILD))
def test_prune_is_layer_skipped_on_the_removed_index(kind: str) -> None:
    """prune:layer=2 of 4 layers: layer_skipped at step 0 on layer_2 (never written), once."""
    model = BUILD[kind](4)
    rec, handle = _run(model, "prune:layer=2")
    assert _found(rec) == [("layer_skipped", 0, "layer_2")]
    assert "never written" in rec.violations[0].report()
    assert [(str(e.fault), e.step) for e in handle.events] == [("prune@0:layer=2", 0)]
    assert len(decoder_layers(model)) == 4


@pytest.mark.parametrize("kind", sorted(BUILD))
def test_dup_layer_idx_is_owner_mismatch_repeated_and_skipped(kind: str) -> None:
    """dup-layer-idx:layer=2,as=0: owner_mismatch and layer_repeated on layer_0, layer_skipped on layer_2."""
    model = BUILD[kind](3)
    rec, handle = _run(model, "dup-layer-idx:layer=2,as=0")
    found = _found(rec)
    assert found[:3] == [("owner_mismatch", 0, "layer_0"), ("layer_repeated", 0, "layer_0"),
                         ("layer_skipped", 0, "layer_2")]
    assert set(found[3:]) == {("owner_mismatch", s, "layer_0") for s in range(1, 5)}
    assert [attention(layer).layer_idx for layer in decoder_layers(model)] == [0, 1, 2]
    assert handle.events[0].step == 0


@pytest.mark.parametrize("kind", sorted(BUILD))
@pytest.mark.parametrize("step,layer", [(2, 1), (0, 0)])
def test_skip_is_layer_skipped_at_that_step(kind: str, step: int, layer: int) -> None:
    """skip@S:layer=L: layer_skipped at step S on layer_L, and nothing after."""
    rec, handle = _run(BUILD[kind](3), f"skip@{step}:layer={layer}")
    assert _found(rec) == [("layer_skipped", step, f"layer_{layer}")]
    assert [e.step for e in handle.events] == [step]


@pytest.mark.parametrize("kind", sorted(BUILD))
def test_partial_crop_is_structural_op_on_each_cropped_layer(kind: str) -> None:
    """partial-crop@2:layers=1 of 3: structural_op_mid_step at step 2 on layer_0 only."""
    rec, _ = _run(BUILD[kind](3), "partial-crop@2")
    assert _found(rec) == [("structural_op_mid_step", 2, "layer_0")]
    assert "crop() on layer 0 of the DynamicCache only" in rec.violations[0].detail


def test_partial_crop_of_most_layers_also_shows_the_whole_one_as_mismatched() -> None:
    """partial-crop@2:layers=2 of 3: the two crops, then seq_len_mismatch on layer_2 (the odd one)."""
    rec, _ = _run(neox(3), "partial-crop@2:layers=2")
    assert _found(rec) == [("structural_op_mid_step", 2, "layer_0"),
                           ("structural_op_mid_step", 2, "layer_1"),
                           ("seq_len_mismatch", 2, "layer_2")]


@pytest.mark.parametrize("kind", sorted(BUILD))
def test_stale_reuse_hands_the_cache_to_the_next_generation(kind: str) -> None:
    """stale-reuse: the second generate() of another prompt gets the first's cache: stale_reuse."""
    model = BUILD[kind](2)
    clean = model.generate(ids([OTHER]), max_new_tokens=3).tolist()
    rec = hf.install(metrics=False, tracing=False)
    with hf.inject_faults("stale-reuse", model) as handle:
        model.generate(ids(), max_new_tokens=4)          # forwards 0-3
        assert handle.not_fired() == [handle.faults[0]]
        model.generate(ids([OTHER]), max_new_tokens=3)
    hf.uninstall()
    assert _found(rec) == [("stale_reuse", 4, "cache")]
    assert [e.step for e in handle.events] == [4]
    assert "generate" not in model.__dict__
    assert model.generate(ids([OTHER]), max_new_tokens=3).tolist() == clean


def test_stale_reuse_of_a_continuation_reports_nothing() -> None:
    """The reused cache under a prompt that continues its own sequence is a correct reuse."""
    model = neox(2)
    rec = hf.install(metrics=False, tracing=False)
    with hf.inject_faults("stale-reuse", model) as handle:
        first = model.generate(ids(), max_new_tokens=4)
        model.generate(torch.cat([first, torch.tensor([[11, 12]])], dim=1), max_new_tokens=3)
    assert handle.fired and _found(rec) == []


def test_faults_compose_and_everything_is_restored_on_error() -> None:
    """Several faults in one block; an exception in the block leaves the model as it was."""
    model = neox(4)
    layers = decoder_layers(model)
    modules = layers._modules
    hooks = (dict(model._forward_pre_hooks), dict(model._forward_hooks))
    rec = hf.install(metrics=False, tracing=False)
    with pytest.raises(RuntimeError, match="boom"):
        with hf.inject_faults(["prune:layer=3", "skip@1:layer=1", "stale-reuse"], model) as handle:
            model.generate(ids(), max_new_tokens=3)
            raise RuntimeError("boom")
    assert _found(rec) == [("layer_skipped", 0, "layer_3"), ("layer_skipped", 1, "layer_1")]
    assert [(e.fault.name, e.step) for e in handle.events] == [("prune", 0), ("skip", 1)]
    assert layers._modules is modules and len(layers) == 4
    hf.uninstall()                                   # removes the recorder's own hooks
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks
    assert "generate" not in model.__dict__
    assert all("forward" not in layer.__dict__ for layer in layers)


def test_a_step_that_never_comes_is_not_fired() -> None:
    """skip@9 in a run of 3 forwards does nothing: not_fired() lists it."""
    model = neox(3)
    rec = hf.install(metrics=False, tracing=False)
    with hf.inject_faults(hf.HFFault("skip", 9), model) as handle:
        model.generate(ids(), max_new_tokens=3)
    assert _found(rec) == [] and handle.steps_seen == 3
    assert [str(f) for f in handle.not_fired()] == ["skip@9:layer=1"] and not handle.fired


def test_parse_defaults_and_round_trip() -> None:
    """The spec syntax of cachescope.faults: defaults, underscores, str() round trip."""
    assert str(hf.parse_hf_fault("skip")) == "skip@2"
    assert str(hf.parse_hf_fault("prune")) == "prune@0"
    assert hf.parse_hf_fault("dup_layer_idx:layer=2,as=0").params == {"layer": 2, "as": 0}
    fault = hf.parse_hf_fault("partial-crop@3:layers=2")
    assert hf.parse_hf_fault(str(fault)) == fault and fault.expected_kinds == (
        "structural_op_mid_step",)
    assert set(hf.HF_FAULTS) == {"prune", "dup-layer-idx", "skip", "partial-crop", "stale-reuse"}


@pytest.mark.parametrize("spec,message", [
    ("", "empty fault spec"),
    ("swap@2", "unknown HF fault 'swap'"),
    ("skip@x", "bad step 'x'"),
    ("prune@2", "acts on the whole block: its step must be 0"),
    ("partial-crop@0", "step must be >= 1"),
    ("skip@2:other=1", "fault skip has no parameter 'other'; its parameters: layer"),
    ("skip@2:layer=a", "bad value 'a' for layer"),
    ("skip@2:layer=1,layer=2", "given twice"),
    ("skip@2:layer", "bad parameter 'layer'"),
])
def test_bad_specs_are_one_line_value_errors(spec: str, message: str) -> None:
    """Each bad spec raises a one-line ValueError naming the problem."""
    with pytest.raises(ValueError) as info:
        hf.parse_hf_fault(spec)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("spec,message", [
    ("skip@2:layer=3", "layer=3 is out of range for a model of 3 decoder layers"),
    ("partial-crop@2:layers=3", "layers=3 must be fewer than the model's 3 decoder layers"),
    ("dup-layer-idx:layer=1,as=1", "layer and as must differ"),
])
def test_faults_are_checked_against_the_model(spec: str, message: str) -> None:
    """Layer indices out of range for the model are refused before anything changes."""
    model = neox(3)
    with pytest.raises(ValueError, match=message):
        with hf.inject_faults(spec, model):
            pass
    with pytest.raises(TypeError, match="nn.ModuleList"):
        with hf.inject_faults("skip", nn.Linear(2, 2)):
            pass
