"""Under ``CI=true`` a skip because something a test needs is missing (a package, a binary,
labml-nn, transformers) is a failure: CI installs everything the tests need, so a skip there
hides a broken set-up. Both kinds of skip are caught: one inside a test (``pytest.skip``,
``importorskip`` in a test or fixture) and one that skips a whole module at collection (a
module-level ``pytest.importorskip``). Only the reasons in ``CI_ALLOWED_SKIPS`` are what a CI
machine legitimately lacks or cannot run.

tests/conftest.py re-exports the two hooks; a pytester project can do the same
(``from _ci import pytest_runtest_makereport, pytest_make_collect_report``).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

__all__ = ["CI_ALLOWED_SKIPS", "pytest_runtest_makereport", "pytest_make_collect_report"]

CI_ALLOWED_SKIPS = (
    "needs a CUDA device",                        # no GPU on CI
    "other test modules (or a plugin) in this session may import torch",   # test_portable in-process
    "needs os.fork",                              # not on this platform
    "fork() semantics are tested on Linux only",  # not on this platform
    "CUDA is available here",                     # a test of the CPU-only path, on a GPU machine
)


def _fail_disallowed_skip(report: Any) -> None:
    if not os.environ.get("CI") or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
    if not any(allowed in reason for allowed in CI_ALLOWED_SKIPS):
        report.outcome = "failed"
        report.longrepr = (f"skipped under CI=true ({reason}); CI installs everything the tests "
                           "need, so this is a failure, not a skip")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    _fail_disallowed_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    _fail_disallowed_skip(outcome.get_result())
