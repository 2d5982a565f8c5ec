"""Tests for the pytest plugin (cachescope.pytest_plugin), run through pytester."""

from __future__ import annotations

import re
import os
from pathlib import Path

import prometheus_client
import pytest

import cachescope
import cachescope.neox  # noqa: F401 - imported here so in-process runs share one copy
import cachescope.pytest_plugin  # noqa: F401
import cachescope.testing  # noqa: F401

from _helpers import plugin_autoloaded

try:  # keep labml_nn (which install() patches when present) loaded across in-process runs
    import labml_nn.neox.utils.cache  # noqa: F401
except Exception:
    pass

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]


# ``-p`` for a module that its entry point already registered is an error in pytest.
PLUGIN = [] if plugin_autoloaded() else ["-p", "cachescope.pytest_plugin"]

# Plugins that would be re-imported by every in-process run (hypothesis alone costs a second).
FAST = ["-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:anyio"]

# Shared by the inner test files: the tiny reference model and a decode that swaps two layers.
PRELUDE = '''
import functools
import pytest
import cachescope as cs
from cachescope.neox import NeoXConfig, NeoXModel

@functools.lru_cache(maxsize=None)
def model():
    return NeoXModel(NeoXConfig.preset("tiny"))

def decode_swapped(probe, n=3):
    m = model()
    original = list(m.layers)

    def on_step(i, _token):
        if i == 0:
            m.layers[1], m.layers[2] = m.layers[2], m.layers[1]
    try:
        probe.decode(m, [1, 2, 3], n, on_step=on_step)
    finally:
        for i, layer in enumerate(original):
            m.layers[i] = layer
'''


def _run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_inner=PRELUDE + source)
    return pytester.runpytest(*PLUGIN, *FAST, *args)


@pytest.fixture(autouse=True)
def _singleton_untouched():
    """The outer process's singleton is the same before and after each inner run."""
    before = cachescope.installed()
    yield
    assert cachescope.installed() is before


def test_fixture_passes_on_a_correct_decode(pytester: pytest.Pytester) -> None:
    """A test using the cachescope fixture on a correct decode loop passes, with the probe installed."""
    result = _run(pytester, '''
def test_ok(cachescope):
    assert cs.installed() is cachescope.cache
    cachescope.watch(model())
    cachescope.decode(model(), [1, 2, 3], 4)
    cachescope.assert_no_violations()
    cachescope.assert_drained()
    cachescope.assert_pop_order("attn_kv_0", [f"layers.{i}.attention" for i in range(4)])
''')
    result.assert_outcomes(passed=1)


def test_failing_assertion_shows_the_violation_report(pytester: pytest.Pytester) -> None:
    """assert_no_violations fails the test with the report's key lines in the output."""
    result = _run(pytester, '''
def test_swapped(cachescope):
    cachescope.watch(model())
    decode_swapped(cachescope)
    cachescope.assert_no_violations()
''')
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*cache 'test_swapped' recorded 2 pop-order violation(s) (owner_mismatch x2)*",
        "*cachescope: owner_mismatch on queue 'attn_kv_0' (family attn_kv) at step 1*",
        "*Pop by   layers.2.attention at step 1 (pop #2 of this queue)*",
        "*Push by  layers.1.attention at step 0*",
        "*Hint: *",
    ])


def test_strict_option_fails_a_test_that_did_not_assert(pytester: pytest.Pytester) -> None:
    """--cachescope-strict fails a test whose cache recorded a violation, with the reports."""
    source = '''
def test_silent(cachescope):
    cachescope.watch(model())
    decode_swapped(cachescope)
'''
    _run(pytester, source).assert_outcomes(passed=1)
    result = _run(pytester, source, "--cachescope-strict")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "cachescope: strict (an unexpected cache violation fails the test)",
        "*cachescope strict mode: 2 unexpected cache violation(s) during test_silent "
        "(cache 'test_silent': owner_mismatch x2).",
        "*Pop by   layers.2.attention*",
        "*FAILED test_inner.py::test_silent - Failed: cachescope strict mode*",
    ])


def test_strict_covers_every_cache_the_test_creates(pytester: pytest.Pytester) -> None:
    """Strict mode also sees an InstrumentedCache the test builds itself, without any fixture."""
    result = _run(pytester, '''
def test_own_cache():
    cache = cs.InstrumentedCache(name="mine", metrics=False, tracing=False)
    cache.push("kv_0", 1)
    cache.pop("kv_0")
    with pytest.raises(IndexError):
        cache.pop("kv_0")
''', "--cachescope-strict")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*1 unexpected cache violation(s) during test_own_cache (cache 'mine': pop_empty x1)*",
        "*cachescope: pop_empty on queue 'kv_0'*",
    ])


def test_strict_ini_option(pytester: pytest.Pytester) -> None:
    """cachescope_strict = true in the ini file turns strict mode on."""
    pytester.makeini("[pytest]\ncachescope_strict = true\n")
    result = _run(pytester, '''
def test_silent(cachescope):
    decode_swapped(cachescope)
''')
    result.assert_outcomes(failed=1)


def test_marker_sets_strictness_per_test(pytester: pytest.Pytester) -> None:
    """@pytest.mark.cachescope(strict=...) wins over the command line, both ways."""
    source = '''
@pytest.mark.cachescope(strict=True)
def test_marked_strict(cachescope):
    decode_swapped(cachescope)

@pytest.mark.cachescope(strict=False)
def test_marked_lenient(cachescope):
    decode_swapped(cachescope)
'''
    result = _run(pytester, source)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*FAILED test_inner.py::test_marked_strict*"])
    result = _run(pytester, source, "--cachescope-strict")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*FAILED test_inner.py::test_marked_strict*"])


def test_expected_violations_pass_strict_mode(pytester: pytest.Pytester) -> None:
    """Violations declared with expect_violations() do not fail a strict test."""
    result = _run(pytester, '''
def test_detects_swap(cachescope):
    cachescope.watch(model())
    with cachescope.expect_violations("owner_mismatch") as caught:
        decode_swapped(cachescope)
    assert (caught[0].consumer, caught[0].producer) == ("layers.2.attention", "layers.1.attention")
''', "--cachescope-strict")
    result.assert_outcomes(passed=1)


def test_marker_and_options_fixture_configure_the_cache(pytester: pytest.Pytester) -> None:
    """cachescope_options (overridable) and marker keywords reach the fixture's InstrumentedCache."""
    pytester.makeconftest('''
import pytest

@pytest.fixture
def cachescope_options():
    return {"timeline_size": 5, "max_violations": 3}
''')
    result = _run(pytester, '''
def test_defaults(cachescope):
    assert cachescope.name == "test_defaults"
    assert cachescope.cache.timeline_size == 5
    assert cachescope.cache.max_violations == 3

@pytest.mark.cachescope(name="custom", timeline_size=9)
def test_marked(cachescope, cachescope_factory):
    assert cachescope.name == "custom"
    assert cachescope.cache.timeline_size == 9
    other = cachescope_factory(name="other", timeline_size=2)
    assert other.cache.timeline_size == 2 and other.cache.max_violations == 3
''')
    result.assert_outcomes(passed=2)


def test_failing_test_gets_a_cachescope_section(pytester: pytest.Pytester) -> None:
    """Without strict mode, a test that fails for another reason shows its caches' violations."""
    result = _run(pytester, '''
def test_breaks(cachescope):
    cachescope.watch(model())
    decode_swapped(cachescope)
    assert 1 == 2
''')
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*Captured cachescope call*",
        "*cachescope: owner_mismatch on queue 'attn_kv_0'*",
    ])


def test_tests_are_isolated(pytester: pytest.Pytester) -> None:
    """A violation in one test does not reach the next; each test gets a fresh installed cache."""
    result = _run(pytester, '''
seen = []

def test_first(cachescope):
    decode_swapped(cachescope)
    assert cachescope.violations
    seen.append(cachescope.cache)

def test_second(cachescope):
    assert cachescope.cache is not seen[0]
    assert cs.installed() is cachescope.cache
    assert cachescope.violations == [] and cachescope.ops == []
    cachescope.decode(model(), [1, 2], 3)
    cachescope.assert_no_violations()

def test_without_fixture():
    assert cs.installed() is None
''', "-p", "no:randomly")
    result.assert_outcomes(passed=3)


def test_factory_probes_are_isolated_and_closed(pytester: pytest.Pytester) -> None:
    """cachescope_factory makes separate, uninstalled caches and closes them at teardown."""
    result = _run(pytester, '''
handles = []

def test_factory(cachescope_factory):
    a, b = cachescope_factory(), cachescope_factory()
    assert (a.name, b.name) == ("test_factory", "test_factory-2")
    assert cs.installed() is None
    handles.append(a.watch(model()))
    a.decode(model(), [1], 2)
    assert b.ops == [] and a.registry is not b.registry
    with b:
        assert cs.get_cache() is b.cache
    assert cs.installed() is None

def test_after():
    assert not handles[0].active
''', "-p", "no:randomly")
    result.assert_outcomes(passed=2)


def test_no_metrics_leak_into_the_global_registry(pytester: pytest.Pytester) -> None:
    """After a run, prometheus_client.REGISTRY holds no cachescope_ metric."""
    result = _run(pytester, '''
def test_decode(cachescope):
    cachescope.decode(model(), [1, 2, 3], 3)
    assert cachescope.sample("cachescope_decode_steps_total") == 3
''')
    result.assert_outcomes(passed=1)
    names = [m.name for m in prometheus_client.REGISTRY.collect()]
    assert not [n for n in names if n.startswith("cachescope")]


def test_marker_rejects_positional_arguments(pytester: pytest.Pytester) -> None:
    """@pytest.mark.cachescope(True) is a usage error that says how to write it."""
    result = _run(pytester, '''
@pytest.mark.cachescope(True)
def test_bad(cachescope):
    pass
''')
    result.stdout.fnmatch_lines(["*takes keyword arguments only*"])
    assert result.ret != 0


def test_plugin_in_a_fresh_interpreter(pytester: pytest.Pytester,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """In a new process the plugin registers its option, ini key and marker."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    result = pytester.runpytest_subprocess(*PLUGIN, "--help")
    result.stdout.fnmatch_lines(["cachescope (KV-cache pop-order checks):",
                                 "*--cachescope-strict*", "*cachescope_strict*"])


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    """The cachescope marker is documented in --markers (so --strict-markers accepts it)."""
    result = pytester.runpytest(*PLUGIN, *FAST, "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.cachescope(strict=None, **cache_options)*"])


def test_tracking_keeps_no_cache_alive(pytester: pytest.Pytester) -> None:
    """Strict mode holds no reference to a test's caches, yet still sees their violations after GC."""
    result = _run(pytester, '''
import gc
import weakref

def test_collectable():
    cache = cs.InstrumentedCache(name="gone", metrics=False, tracing=False)
    ref = weakref.ref(cache)
    with pytest.raises(KeyError):
        cache.pop("never_pushed")
    del cache
    gc.collect()
    assert ref() is None
''', "--cachescope-strict")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*(cache 'gone': pop_missing x1)*"])


def _doc_blocks() -> list[str]:
    text = (REPO / "docs" / "testing.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_docs_example_test_passes(pytester: pytest.Pytester) -> None:
    """The copy-pasteable example in docs/testing.md passes as written, also in strict mode."""
    pytester.makepyfile(test_kv_cache=_doc_blocks()[0])
    result = pytester.runpytest(*PLUGIN, *FAST, "--cachescope-strict")
    result.assert_outcomes(passed=2)


def test_docs_capture_example_runs() -> None:
    """The 'Without pytest' example in docs/testing.md runs and restores the singleton."""
    block = next(b for b in _doc_blocks() if "capture()" in b)
    namespace: dict = {}
    exec(compile(block, "docs/testing.md", "exec"), namespace)
    assert namespace["probe"].violations == []
