"""Fixtures shared by the test modules.

pytest imports this file in its default "prepend" import mode, which first puts this directory
(tests/) on ``sys.path``; so every test module can import the shared helper modules beside it by
name, without editing ``sys.path`` itself:

- ``_helpers``: cache constructions (``make_cache``, ``construct``, ``CONSTRUCTIONS``) and other
  helpers that need no torch;
- ``_kvloop``: labml-style layers (``Attention``, the bare ``KVLayer``) and decode loops
  (``decode``, ``labml_decode``);
- ``_loop``: the tiny reference NeoX model, ``run_decode`` and in-memory OpenTelemetry;
- ``_prom``: a real Prometheus on loopback, and the dashboard/rules helpers.

Nothing here may import torch at module level (directly or through ``_kvloop``/``_loop``):
tests/test_portable.py runs under this conftest on interpreters without torch
(scripts/test_pythons.sh) and checks that torch is never imported.
"""

from __future__ import annotations

import os

import pytest

from _helpers import CONSTRUCTIONS


@pytest.fixture(params=CONSTRUCTIONS)
def kind(request: pytest.FixtureRequest) -> str:
    """Each cache construction of ``_helpers.CONSTRUCTIONS`` in turn ("bare", then "default");
    build the cache with ``_helpers.construct(kind)``."""
    return request.param


# Under CI=true a test that skips because something it needs is missing (a package, a binary,
# labml-nn) fails instead: CI installs everything the tests need, so a skip there hides a broken
# set-up. Only the skips below are what a CI machine legitimately lacks or cannot run.
_CI_ALLOWED_SKIPS = (
    "needs a CUDA device",                        # no GPU on CI
    "other test modules (or a plugin) in this session may import torch",   # test_portable in-process
    "needs os.fork",                              # not on this platform
    "fork() semantics are tested on Linux only",  # not on this platform
    "CUDA is available here",                     # a test of the CPU-only path, on a GPU machine
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if not os.environ.get("CI") or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
    if not any(allowed in reason for allowed in _CI_ALLOWED_SKIPS):
        report.outcome = "failed"
        report.longrepr = (f"skipped under CI=true ({reason}); CI installs everything the tests "
                           "need, so this is a failure, not a skip")
