"""The README's claims, executed."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import cachescope

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_starts_with_the_two_commands() -> None:
    """The README opens with the set-up-and-run command and the set-up-and-test command."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks[0].strip() == "bash scripts/bootstrap.sh && .venv/bin/cachescope run"
    assert blocks[1].strip() == "bash scripts/bootstrap.sh test && .venv/bin/python -m pytest -q"


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run calls exactly the README's test command."""
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/bootstrap.sh test && .venv/bin/python -m pytest -q" in ci


def test_reordered_layer_example_prints_what_the_readme_says() -> None:
    """The 'Catching a reordered layer' example reports owner_mismatch at step 1: '2' got '1''s item."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(_python_blocks()[0], "README.md", "exec"), {"__name__": "readme"})
    finally:
        cachescope.uninstall()
    lines = out.getvalue().splitlines()
    assert lines[0] == "owner_mismatch 1 2 1"
    report = "\n".join(lines[1:])
    assert "Pop by   2 at step 1" in report
    assert "Push by  1 at step 0" in report
    assert "layers ran in a different order" in report
    assert "Recent ops on 'attn_kv_0'" in report


def test_every_violation_kind_is_documented() -> None:
    """Each kind the checker can report appears in the README's table."""
    text = README.read_text()
    for kind in cachescope.KINDS:
        assert f"| `{kind}` |" in text, kind


def test_reference_model_snippet_runs() -> None:
    """The reference-model snippet generates 8 greedy tokens and leaves the cache clean."""
    block = next(b for b in _python_blocks() if "from cachescope.neox import" in b)
    scope: dict = {"__name__": "readme"}
    exec(compile(block, "README.md", "exec"), scope)
    assert len(scope["tokens"]) == 8
    assert cachescope.get_cache().q_size("attn_kv_0") is None


def test_readme_command_lines_use_real_options() -> None:
    """Every `cachescope ...` line in the README parses with the real CLI's argument parser."""
    from cachescope.cli import build_parser

    parser = build_parser()
    text = README.read_text()
    lines = [ln.split("#")[0].strip() for ln in text.splitlines() if ln.startswith("cachescope ")]
    assert len(lines) >= 8
    for line in lines:
        parser.parse_args(line.split()[1:])


def test_readme_pytest_example_passes(pytester) -> None:
    """The README's pytest example passes when run by pytest with the installed plugin."""
    block = next(b for b in _python_blocks() if "def test_decode(cachescope)" in b)
    pytester.makepyfile(test_example=block)
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_core_snippet_exports_and_attributes_as_described() -> None:
    """The 'One core' snippet attaches metrics and tracing from outside, names the owner, and
    both exporters detach on close."""
    block = next(b for b in _python_blocks() if "metrics.export(cache" in b)
    scope: dict = {"__name__": "readme"}
    exec(compile(block, "README.md", "exec"), scope)
    cache = scope["cache"]
    assert cache.pending("kv_1")[0].owner == "layer0"
    assert cache.sinks == ()
    reg = scope["m"].registry
    assert reg.get_sample_value("cachescope_ops_total",
                                {"cache": cache.name, "op": "push", "family": "kv"}) is None
