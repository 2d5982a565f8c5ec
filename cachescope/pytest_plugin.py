"""pytest plugin (``pytest11`` entry point ``cachescope``): fixtures for KV-cache tests and a
strict mode that fails any test whose caches recorded a pop-order violation.

Fixtures (function scope):

* ``cachescope`` -- a ``cachescope.testing.CacheProbe`` installed as the cache singleton (for
  cachescope and for labml_nn) for the test, with its own metrics registry and in-memory tracer.
  ``cachescope.watch(model)`` of a Hugging Face transformers model installs ``cachescope.hf``
  for the test (unless installed already) and the probe's assertions cover it.
* ``cachescope_factory`` -- ``factory(**options) -> CacheProbe``: more isolated caches, not
  installed; closed at teardown.
* ``cachescope_options`` -- ``InstrumentedCache`` options for both; override it in a conftest.
* ``cachescope_ranks`` -- ``run(fn, nproc=2, **options) -> RankResults``:
  ``cachescope.testing.run_ranks`` (``fn`` on real gloo ranks, each with its own cache and the
  cross-rank checker); each rank's cache takes ``cachescope_options`` and the marker's options.

Strict mode (``--cachescope-strict``, ini ``cachescope_strict = true``, or per test
``@pytest.mark.cachescope(strict=True)``): a test fails when an ``InstrumentedCache`` created
during it (or the one installed when it started, or a view of an installed ``cachescope.hf``:
transformers' caches), or a rank of a ``cachescope_ranks`` /
``run_ranks`` call, recorded a violation the test did not declare (``probe.expect_violations(...)``;
for ranks ``results.assert_violation(...)``). The failure message holds the violation reports. Without
strict mode, a failing test still gets its violation reports in a "cachescope" report section.

"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import sys

import pytest

if "cachescope.testing" not in sys.modules:  # else it is too late, and pytest would warn
    pytest.register_assert_rewrite("cachescope.testing")

if TYPE_CHECKING:
    from cachescope.testing import CacheProbe, RankResults, _CacheTracker

__all__ = ["cachescope", "cachescope_factory", "cachescope_options", "cachescope_ranks"]

_MARKER = "cachescope"
_NAME_LIMIT = 64


class _ItemState:
    __slots__ = ("tracker", "strict", "called")

    def __init__(self, tracker: "_CacheTracker", strict: bool) -> None:
        self.tracker = tracker
        self.strict = strict
        self.called = False


_STATE = pytest.StashKey[_ItemState]()


# --------------------------------------------------------------------------- configuration
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cachescope", "cachescope (KV-cache pop-order checks)")
    group.addoption(
        "--cachescope-strict", action="store_true", default=None, dest="cachescope_strict",
        help="fail every test in which an InstrumentedCache recorded a pop-order violation that "
             "the test did not declare with probe.expect_violations(); per test: "
             "@pytest.mark.cachescope(strict=False)")
    parser.addini("cachescope_strict", type="bool", default=False,
                  help="default of --cachescope-strict")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cachescope(strict=None, **cache_options): cachescope settings for this test. "
        "strict=True/False fails (or not) the test on any unexpected cache violation, whatever "
        "--cachescope-strict says; other keywords are InstrumentedCache options for the "
        "cachescope, cachescope_factory and cachescope_ranks fixtures (e.g. timeline_size=1024).")


def _global_strict(config: pytest.Config) -> bool:
    option = config.getoption("cachescope_strict", default=None)
    if option is not None:
        return bool(option)
    try:
        return bool(config.getini("cachescope_strict"))
    except ValueError:  # plugin registered late (pytest_plugins in a test module): no ini option
        return False


def _marker_kwargs(node: pytest.Item) -> dict[str, Any]:
    """Keyword arguments of the closest ``cachescope`` marker (module, class and function
    markers merge; the closest wins)."""
    merged: dict[str, Any] = {}
    for marker in reversed(list(node.iter_markers(_MARKER))):
        if marker.args:
            raise pytest.UsageError(
                f"{node.nodeid}: @pytest.mark.cachescope takes keyword arguments only "
                f"(strict=..., InstrumentedCache options), got positional {marker.args!r}")
        merged.update(marker.kwargs)
    return merged


def _item_strict(item: pytest.Item) -> bool | None:
    """The marker's ``strict`` (None when the marker does not say)."""
    strict = _marker_kwargs(item).get("strict")
    return None if strict is None else bool(strict)


def pytest_report_header(config: pytest.Config) -> str | None:
    if _global_strict(config):
        return "cachescope: strict (an unexpected cache violation fails the test)"
    return None


# --------------------------------------------------------------------------- strict mode
def _failure_text(item: pytest.Item, violations: list[Any], when: str) -> str:
    from cachescope.testing import RankViolation, _kinds, _violation_meaning, format_violations
    from cachescope._testing_dist import _meaning
    caches = ", ".join(dict.fromkeys(repr(v.cache) for v in violations))
    ranks = any(isinstance(v, RankViolation) for v in violations)
    declare = "wrap that code in `with cachescope.expect_violations(...)`"
    if ranks:
        declare += " (ranks of run_ranks: `results.assert_violation(kind, rank=..., step=...)`)"
    meaning = _meaning(violations) if ranks else _violation_meaning(violations)
    return (
        f"cachescope strict mode: {len(violations)} unexpected cache violation(s) {when} "
        f"{item.name} (cache {caches}: {_kinds(violations)}).\n"
        f"{meaning} Fix the decode loop; if the test provokes violations on purpose, {declare} "
        "or mark the test @pytest.mark.cachescope(strict=False).\n\n"
        + format_violations(violations))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    marked = _item_strict(item)
    strict = _global_strict(item.config) if marked is None else marked
    from cachescope.testing import _CacheTracker
    item.stash[_STATE] = _ItemState(_CacheTracker.start(), strict)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    state = item.stash.get(_STATE, None)
    if state is None:
        return (yield)
    try:
        result = yield
    except BaseException:
        violations = state.tracker.take_unexpected()
        if violations:
            from cachescope.testing import format_violations
            item.add_report_section("call", "cachescope", format_violations(violations))
        raise
    state.called = True
    violations = state.tracker.take_unexpected()
    if violations and state.strict:
        pytest.fail(_failure_text(item, violations, "during"), pytrace=False)
    return result


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    state = item.stash.get(_STATE, None)
    if state is None:
        return (yield)
    try:
        result = yield
    finally:
        late = state.tracker.take_unexpected()
        state.tracker.stop()
        del item.stash[_STATE]
    if late and state.strict and state.called:
        pytest.fail(_failure_text(item, late, "in the teardown of"), pytrace=False)
    return result


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def cachescope_options() -> dict[str, Any]:
    """``InstrumentedCache`` keyword options for ``cachescope`` and ``cachescope_factory``.
    Override this fixture (in a conftest, a module or a class) to change them; the
    ``cachescope`` marker's keywords (other than ``strict``) are applied on top."""
    return {}


@pytest.fixture
def cachescope_factory(request: pytest.FixtureRequest,
                       cachescope_options: dict[str, Any]) -> Iterator[Callable[..., "CacheProbe"]]:
    """``factory(**options) -> CacheProbe``: a new isolated cache (own registry, tracer, op log),
    not installed as the singleton (``with probe:`` installs it). Options apply over
    ``cachescope_options`` and the marker's. Every probe is closed at teardown."""
    from cachescope.testing import CacheProbe

    base = dict(cachescope_options)
    base.update({k: v for k, v in _marker_kwargs(request.node).items() if k != "strict"})
    node_name = request.node.name[:_NAME_LIMIT]
    probes: list[CacheProbe] = []

    def factory(**options: Any) -> CacheProbe:
        merged = {**base, **options}
        if "name" not in merged:
            merged["name"] = node_name if not probes else f"{node_name}-{len(probes) + 1}"
        probe = CacheProbe(**merged)
        probes.append(probe)
        return probe

    try:
        yield factory
    finally:
        for probe in reversed(probes):
            probe.close()


@pytest.fixture
def cachescope(cachescope_factory: Callable[..., "CacheProbe"]) -> Iterator["CacheProbe"]:
    """A ``CacheProbe`` whose cache is the process singleton (``cachescope.get_cache()`` and
    labml_nn's ``get_cache()``) for this test; the previous singleton is restored afterwards.
    ``watch`` of a transformers model installs ``cachescope.hf`` for the test (see
    ``CacheProbe.install_hf``); it is uninstalled afterwards if the probe installed it."""
    probe = cachescope_factory()
    probe.install()
    try:
        yield probe
    finally:
        probe.uninstall()


@pytest.fixture
def cachescope_ranks(request: pytest.FixtureRequest,
                     cachescope_options: dict[str, Any]) -> Callable[..., "RankResults"]:
    """``run(fn, nproc=2, **options) -> RankResults``: ``cachescope.testing.run_ranks(fn, nproc,
    **options)`` (``fn(ctx, *args)`` on ``nproc`` real gloo ranks, each with its own cache and
    the cross-rank checker). Each rank's cache takes ``cachescope_options``, the marker's options
    and ``cache_options=``, and is named ``{test name}-rank{r}``. In strict mode the test fails on
    any violation a rank recorded that ``results.assert_violation(...)`` did not match."""
    from cachescope.testing import run_ranks

    base = dict(cachescope_options)
    base.update({k: v for k, v in _marker_kwargs(request.node).items() if k != "strict"})
    base.setdefault("name", request.node.name[:_NAME_LIMIT])

    def run(fn: Callable[..., Any], nproc: int = 2, **options: Any) -> "RankResults":
        cache_options = {**base, **(options.pop("cache_options", None) or {})}
        return run_ranks(fn, nproc, cache_options=cache_options, **options)

    return run
