"""Under CI=true a skip for something missing fails the run, whether it happens in a test or
skips a whole module at collection (a module-level importorskip); allowed reasons still skip,
and without CI every skip stays a skip (tests/_ci.py)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CONFTEST = "from _ci import pytest_make_collect_report, pytest_runtest_makereport\n"
MODULE_SKIP = ("import pytest\npytest.importorskip('no_such_package_cachescope')\n"
               "def test_never(): pass\n")
IN_TEST = ("import pytest\n"
           "def test_missing(): pytest.importorskip('no_such_package_cachescope')\n"
           "def test_gpu(): pytest.skip('needs a CUDA device')\n"
           "def test_fine(): pass\n")


def _run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str, **files: str) -> pytest.RunResult:
    monkeypatch.setenv("CI", ci)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(**files)
    return pytester.runpytest_inprocess("-p", "no:randomly", "-p", "no:cachescope")


def test_a_module_skipped_at_collection_is_an_error_under_ci(pytester, monkeypatch) -> None:
    result = _run(pytester, monkeypatch, "true", test_module_skip=MODULE_SKIP)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*skipped under CI=true*no_such_package_cachescope*"])
    assert result.ret != 0


def test_a_skip_in_a_test_fails_under_ci_unless_allowed(pytester, monkeypatch) -> None:
    result = _run(pytester, monkeypatch, "true", test_in_test=IN_TEST)
    result.assert_outcomes(failed=1, skipped=1, passed=1)
    result.stdout.fnmatch_lines(["*skipped under CI=true*no_such_package_cachescope*"])


def test_without_ci_skips_stay_skips(pytester, monkeypatch) -> None:
    result = _run(pytester, monkeypatch, "", test_module_skip=MODULE_SKIP, test_in_test=IN_TEST)
    result.assert_outcomes(skipped=3, passed=1)
