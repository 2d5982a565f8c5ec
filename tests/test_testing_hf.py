"""cachescope.testing and the pytest plugin on Hugging Face transformers models (cachescope.hf):
``probe.watch(model)`` installs cachescope.hf for the probe, and the probe's readers, assertions
and the plugin's strict mode cover what it finds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")

import prometheus_client  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402
from transformers import cache_utils  # noqa: E402
from transformers.generation.utils import GenerationMixin  # noqa: E402

import cachescope  # noqa: E402
import cachescope.hf as hf  # noqa: E402
import cachescope.metrics  # noqa: E402
import cachescope.pytest_plugin  # noqa: E402, F401
from cachescope.testing import CacheProbe, capture  # noqa: E402

from _helpers import plugin_autoloaded  # noqa: E402
from _hf_models import ids, llama, neox  # noqa: E402

pytest_plugins = ["pytester"]

HERE = Path(__file__).resolve().parent
PLUGIN = [] if plugin_autoloaded() else ["-p", "cachescope.pytest_plugin"]
FAST = ["-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:anyio"]
NEOX_OWNERS = [f"gpt_neox.layers.{i}.attention" for i in range(3)]

# The snippet given for README.md ("Asserting cache invariants in your tests"), run as written
# by test_readme_hf_example: keep the two identical.
README_HF_EXAMPLE = '''\
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

def test_generate_keeps_the_cache_consistent(cachescope):
    config = GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=3,
                           num_attention_heads=4, intermediate_size=64, eos_token_id=None)
    model = GPTNeoXForCausalLM(config).eval()
    cachescope.watch(model)          # a transformers model: cachescope.hf installed for the test
    model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=8)
    cachescope.assert_no_violations()
    cachescope.assert_op_counts(family="layer", push=3 * 8, pop=3 * 7)   # 3 layers, 8 forwards
'''


@pytest.fixture(autouse=True)
def _nothing_installed() -> Any:
    """Every test starts and ends with no cachescope singleton and no cachescope.hf installed."""
    assert cachescope.installed() is None and hf.installed() is None
    yield
    hf.uninstall()      # a failed test must not leave transformers patched for the next ones
    assert cachescope.installed() is None


def _patched() -> dict[tuple[type, str], Any]:
    """The functions cachescope.hf replaces (a sample: Cache.update and generate)."""
    return {(cls, name): cls.__dict__[name]
            for cls, name in [(cache_utils.Cache, "update"), (GenerationMixin, "generate")]}


def _assertion_text(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(AssertionError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# --------------------------------------------------------------------------- install / uninstall
def test_watch_installs_cachescope_hf_for_the_probe_only() -> None:
    """watch() of a transformers model installs cachescope.hf; the end of the block puts back
    transformers' functions and the model's hooks, and the probe stays readable."""
    before = _patched()
    model = neox(3)
    hooks = dict(model._forward_pre_hooks)
    with capture() as probe:
        handle = probe.watch(model)
        assert hf.installed() is probe.hf_recorder is not None
        assert all(cls.__dict__[name] is not fn for (cls, name), fn in before.items())
        model.generate(ids(), max_new_tokens=3)
    assert hf.installed() is None
    assert _patched() == before
    assert dict(model._forward_pre_hooks) == hooks
    handle.remove()                                   # harmless after the uninstall
    assert len(probe.pops("layer")) == 3 * 2
    model.generate(ids(), max_new_tokens=3)           # no longer recorded
    assert len(probe.pops("layer")) == 3 * 2


def test_an_installed_recorder_is_reused_and_left_installed() -> None:
    """A recorder installed before the probe is reused (not replaced) and still installed after
    it; the probe counts only the violations found after it attached."""
    rec = hf.install(registry=CollectorRegistry(), tracing=False)
    model = neox(4)
    with hf.inject_faults("prune", model):
        model.generate(ids(), max_new_tokens=2)
    assert [v.kind for v in rec.violations] == ["layer_skipped"]
    with capture() as probe:
        probe.watch(model)
        assert probe.hf_recorder is rec
        model.generate(ids(), max_new_tokens=3)
        probe.assert_no_violations()
        with hf.inject_faults("prune", model):
            model.generate(ids(), max_new_tokens=3)
    assert hf.installed() is rec
    assert [v.kind for v in probe.violations] == ["layer_skipped"]
    assert probe.violations[0] is rec.violations[1]


def test_a_probe_that_is_not_installed_still_installs_cachescope_hf() -> None:
    """A probe that is not the installed singleton (cachescope_factory's) installs cachescope.hf
    on watch all the same, and uninstall() takes it away again."""
    probe = CacheProbe(metrics=False, tracing=False)
    probe.watch(neox(2))
    assert hf.installed() is probe.hf_recorder is not None
    probe.uninstall()
    assert hf.installed() is None
    probe.close()


def test_decode_refuses_a_transformers_model() -> None:
    """probe.decode() drives cachescope's reference loop: a transformers model is told to use
    generate instead of failing somewhere inside."""
    probe = CacheProbe(metrics=False, tracing=False)
    with pytest.raises(TypeError, match=r"call probe.watch\(model\) and then model.generate"):
        probe.decode(neox(2), [1, 2], 2)
    assert hf.installed() is None


# --------------------------------------------------------------------------- assertions
def test_assertions_pass_on_a_correct_generate() -> None:
    """On a correct generate, the probe's assertions pass with the view's real figures, and
    fail with them when the limits are wrong."""
    model = neox(3)
    with capture() as probe:
        probe.watch(model)
        model.generate(ids(), max_new_tokens=5)          # 5 forwards
    probe.assert_no_violations()
    probe.assert_op_counts(family="layer", push=3 * 5, pop=3 * 4)
    probe.assert_op_counts(push=3 * 5, pop=3 * 4)
    probe.assert_max_depth("layer", 3)
    probe.assert_pop_order("layer_1", [NEOX_OWNERS[1]] * 4)
    probe.assert_pop_order("layer", NEOX_OWNERS * 4)
    assert "peaked at 3 item(s) held at once, above the limit of 2" in _assertion_text(
        probe.assert_max_depth, "layer", 2)
    text = _assertion_text(probe.assert_op_counts, family="layer", push=3 * 5, pop=3 * 5)
    assert "op counts of queue family 'layer' of cache 'hf' differ" in text
    assert "pop: expected 15, got 12" in text
    assert "families seen: layer" in _assertion_text(probe.assert_max_depth, "attn_kv", 3)


def test_assert_no_violations_shows_the_hf_report() -> None:
    """A pruned layer (inject_faults) fails assert_no_violations with the report: kind, layer,
    step and hint."""
    model = neox(4)
    with capture() as probe:
        probe.watch(model)
        with hf.inject_faults("prune", model):           # layer 2 of 4 removed
            model.generate(ids(), max_new_tokens=3)
    text = _assertion_text(probe.assert_no_violations)
    assert "cache 'hf' recorded 1 violation(s) (layer_skipped x1); expected none." in text
    assert "cachescope: layer_skipped on queue 'layer_2' (family layer) at step 0" in text
    assert "Hint:" in text


def test_expect_violations_accepts_hf_kinds() -> None:
    """expect_violations() takes cachescope.hf's kinds; the kinds not listed stay unexpected."""
    model = neox(3)
    with capture() as probe:
        probe.watch(model)
        with probe.expect_violations("owner_mismatch") as caught:
            with hf.inject_faults("dup-layer-idx:layer=2,as=0", model):
                model.generate(ids(), max_new_tokens=2)
    assert {(v.kind, v.queue) for v in caught} == {("owner_mismatch", "layer_0")}
    assert {(v.consumer, v.producer) for v in caught} == {(NEOX_OWNERS[2], NEOX_OWNERS[0]),
                                                          (NEOX_OWNERS[0], NEOX_OWNERS[2])}
    assert {v.kind for v in probe.unexpected_violations} == {"layer_repeated", "layer_skipped"}
    text = _assertion_text(probe.assert_no_violations)
    assert "recorded 2 violation(s) (layer_repeated x1, layer_skipped x1)" in text

    with capture() as probe:
        probe.watch(model)
        with probe.expect_violations("owner_mismatch", "layer_repeated", "layer_skipped"):
            with hf.inject_faults("dup-layer-idx:layer=2,as=0", model):
                model.generate(ids(), max_new_tokens=2)
    probe.assert_no_violations()


def test_expect_violations_fails_when_the_model_is_correct() -> None:
    """A block expected to break the cache that does not fails, naming the caches it watched."""
    model = llama(2)
    with capture() as probe:
        probe.watch(model)
        text = _assertion_text(_expect_during_generate, probe, model, "layer_skipped")
    assert ("expected violations of kind layer_skipped on caches 'capture', 'hf', but the block "
            "recorded none") in text


def _expect_during_generate(probe: CacheProbe, model: Any, kind: str) -> None:
    with probe.expect_violations(kind):
        model.generate(ids(), max_new_tokens=2)


def test_install_hf_covers_models_that_are_not_watched() -> None:
    """install_hf() alone: every transformers cache is checked for the probe (a model that was
    never watched included)."""
    model = neox(4)
    with capture() as probe:
        rec = probe.install_hf()
        assert hf.installed() is rec
        with hf.inject_faults("prune:layer=1", model):
            model.generate(ids(), max_new_tokens=2)
    assert [(v.kind, v.queue) for v in probe.violations] == [("layer_skipped", "layer_1")]
    probe.assert_op_counts(family="layer", push=3 * 2, pop=3)
    assert hf.installed() is None


def test_strict_probe_raises_at_the_first_hf_violation() -> None:
    """The probe's strict option reaches cachescope.hf: the model's forward raises HFCacheError."""
    model = neox(3)
    with capture(strict=True) as probe:
        probe.watch(model)
        with pytest.raises(hf.HFCacheError) as info:
            with hf.inject_faults("dup-layer-idx", model):
                model.generate(ids(), max_new_tokens=2)
    assert info.value.violation.kind == "owner_mismatch"


# --------------------------------------------------------------------------- telemetry
def test_metrics_go_to_the_probe_registry() -> None:
    """The views export to the probe's registry; sample() adds up the probe's caches, or reads
    one with an explicit cache label. Nothing reaches the global registries."""
    model = neox(4)
    with capture() as probe:
        probe.watch(model)
        with hf.inject_faults("prune", model):
            model.generate(ids(), max_new_tokens=4)
    assert probe.sample("cachescope_ops_total", {"op": "push", "family": "layer"}) == 3 * 4
    assert probe.sample("cachescope_violations_total",
                        {"family": "layer", "kind": "layer_skipped"}) == 1
    assert probe.sample("cachescope_decode_steps_total") == 4
    assert probe.sample("cachescope_decode_steps_total", {"cache": "hf"}) == 4
    assert probe.sample("cachescope_decode_steps_total", {"cache": "capture"}) == 0
    for registry in (prometheus_client.REGISTRY, cachescope.metrics.REGISTRY):
        assert registry.get_sample_value("cachescope_decode_steps_total", {"cache": "hf"}) is None


def test_spans_go_to_the_probe_exporter() -> None:
    """With opentelemetry-sdk, the generate and decode_step spans of the views are the probe's."""
    pytest.importorskip("opentelemetry.sdk")
    model = neox(2)
    with capture() as probe:
        probe.watch(model)
        model.generate(ids(), max_new_tokens=3)
    assert len(probe.spans("generate")) == 1
    assert len(probe.spans("decode_step")) == 3


def test_report_includes_the_recorder_summary() -> None:
    """report() is the recorder's summary when the probe's own cache saw nothing."""
    model = neox(2)
    with capture() as probe:
        probe.watch(model)
        model.generate(ids(), max_new_tokens=2)
    text = probe.report()
    assert "cachescope summary for cache 'hf'" in text
    assert "cache 'capture'" not in text


# --------------------------------------------------------------------------- the pytest plugin
INNER = '''
import pytest
import cachescope.hf as hf
from _hf_models import ids, neox

def generate(probe, fault=None):
    model = neox(4)
    probe.watch(model)
    if fault is None:
        return model.generate(ids(), max_new_tokens=3)
    with hf.inject_faults(fault, model):
        return model.generate(ids(), max_new_tokens=3)
'''


def _run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(_hf_models=(HERE / "_hf_models.py").read_text(), test_inner=INNER + source)
    return pytester.runpytest_inprocess(*PLUGIN, *FAST, *args)


def test_plugin_fixture_fails_on_an_injected_fault(pytester: pytest.Pytester) -> None:
    """The cachescope fixture on a transformers model: a correct generate passes, a pruned
    layer fails assert_no_violations with the report, and cachescope.hf is gone afterwards."""
    result = _run(pytester, '''
def test_correct(cachescope):
    generate(cachescope)
    cachescope.assert_no_violations()

def test_pruned(cachescope):
    generate(cachescope, "prune")
    cachescope.assert_no_violations()

def test_after():
    assert hf.installed() is None
''', "-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "*cache 'hf' recorded 1 violation(s) (layer_skipped x1); expected none.*",
        "*cachescope: layer_skipped on queue 'layer_2' (family layer) at step 0*",
        "*FAILED test_inner.py::test_pruned*",
    ])
    assert hf.installed() is None


def test_plugin_strict_mode_sees_hf_violations(pytester: pytest.Pytester) -> None:
    """In strict mode a test that provokes an HF violation without asserting fails with the
    reports; one that declares it with expect_violations passes."""
    result = _run(pytester, '''
def test_silent(cachescope):
    generate(cachescope, "prune")

def test_declared(cachescope):
    with cachescope.expect_violations("layer_skipped"):
        generate(cachescope, "prune")
''', "--cachescope-strict")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*cachescope strict mode: 1 unexpected cache violation(s) during test_silent "
        "(cache 'hf': layer_skipped x1).",
        "Each means a layer of the KV cache was extended, skipped, resized or reused out of turn*",
        "*FAILED test_inner.py::test_silent*",
    ])


def test_plugin_strict_mode_sees_views_made_before_the_test(pytester: pytest.Pytester) -> None:
    """A recorder installed for the whole session and a model built in an earlier test: the
    model's view existed before the test started, and strict mode still sees its violations."""
    pytester.makeconftest('''
import pytest
import cachescope.hf as hf

@pytest.fixture(scope="session", autouse=True)
def hf_recorder():
    rec = hf.install(metrics=False, tracing=False)
    yield rec
    hf.uninstall()
''')
    result = _run(pytester, '''
MODELS = []

def test_first():
    MODELS.append(neox(4))
    MODELS[0].generate(ids(), max_new_tokens=2)

def test_pruned_later():
    with hf.inject_faults("prune", MODELS[0]):
        MODELS[0].generate(ids(), max_new_tokens=2)
''', "--cachescope-strict", "-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*1 unexpected cache violation(s) during test_pruned_later "
                                 "(cache 'hf': layer_skipped x1)*"])


def _readme_hf_example() -> str:
    """The README's block with the Hugging Face test: exactly README_HF_EXAMPLE, so the README
    cannot drift from what is tested."""
    text = (HERE.parent / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
              if "def test_generate_keeps_the_cache_consistent(cachescope)" in b]
    assert blocks == [README_HF_EXAMPLE], "README's HF example differs from the tested one"
    return README_HF_EXAMPLE


def test_readme_hf_example(pytester: pytest.Pytester) -> None:
    """The README's Hugging Face example passes as written, also in strict mode."""
    pytester.makepyfile(test_readme_hf_block=_readme_hf_example())
    result = pytester.runpytest_inprocess(*PLUGIN, *FAST, "--cachescope-strict")
    result.assert_outcomes(passed=1)
    assert hf.installed() is None


def test_docs_hf_example_passes(pytester: pytest.Pytester) -> None:
    """The Hugging Face example of docs/testing.md passes as written, also in strict mode."""
    text = (HERE.parent / "docs" / "testing.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S)
                 if "GPTNeoXForCausalLM" in b)
    pytester.makepyfile(test_hf_kv_cache=block)
    result = pytester.runpytest_inprocess(*PLUGIN, *FAST, "--cachescope-strict")
    result.assert_outcomes(passed=2)
