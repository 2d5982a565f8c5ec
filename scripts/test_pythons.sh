#!/usr/bin/env bash
# Build, install and test cachescope on the other supported CPythons, without torch:
#   bash scripts/test_pythons.sh              -> 3.10, 3.12 and 3.13
#   bash scripts/test_pythons.sh 3.12         -> only the versions named
#
# For each version, the newest ~/.pyenv/versions/X.Y.* (or $PYENV_ROOT/versions) gets a virtual
# environment in .venv-pyXY (reused on reruns), the test dependencies (no torch: torch's CPU
# wheel on disk is for 3.11 only, and an open range would pull a multi-GB CUDA build), then
# cachescope itself, built from this tree with `pip install --no-deps -e .` (never its
# dependencies: that would pull torch), a smoke import from outside the tree, and
# tests/test_portable.py. One result line per version; the exit status is non-zero if any
# version failed. A missing interpreter is skipped, except under CI=true where it fails.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYENV_VERSIONS=${PYENV_ROOT:-$HOME/.pyenv}/versions
if [ $# -gt 0 ]; then VERSIONS=("$@"); else VERSIONS=(3.10 3.12 3.13); fi

# Ranges within pyproject.toml's (cachescope's dependencies and its [test] extra), minus torch
# and the packages that need it. setuptools builds the package (--no-build-isolation: no
# throwaway build environment on every run); >=70.1 needs no `wheel` for editable installs.
DEPS=(
    "prometheus-client>=0.20,<1"
    "opentelemetry-api>=1.20,<2"
    "opentelemetry-sdk>=1.20,<2"
    "pytest>=7.4,<10"
    "hypothesis>=6.80,<7"
    "setuptools>=70.1"
)
TEST_TIMEOUT=${TEST_TIMEOUT:-600}

# The package must import without torch, and so must every module that needs no model.
SMOKE='
import importlib, importlib.metadata as md, os, sys
import cachescope
from cachescope import InstrumentedCache, PopOrderError
root = os.environ["CACHESCOPE_ROOT"]
assert os.path.realpath(cachescope.__file__).startswith(os.path.realpath(root) + os.sep), \
    f"imported {cachescope.__file__}, not the package in {root}"
assert md.version("cachescope") == cachescope.__version__, md.version("cachescope")
plugins = {ep.name: ep.value for ep in md.entry_points(group="pytest11")}
assert plugins.get("cachescope") == "cachescope.pytest_plugin", plugins
for mod in ("metrics", "tracing", "record", "analyze", "testing", "pytest_plugin", "cli", "_sdk",
            "distributed", "hf"):
    importlib.import_module("cachescope." + mod)
c = InstrumentedCache(name="smoke")
c.set("state_ids", (None, 0))
with c.owner("a"):
    c.push("attn_kv_0", 1)
with c.owner("b"):
    c.push("attn_kv_0", 2)
c.end_step(tokens=1)
c.set("state_ids", (0, 1))
with c.owner("b"):
    assert c.pop("attn_kv_0") == 1
assert [v.kind for v in c.violations] == ["owner_mismatch"], c.violations
assert "torch" not in sys.modules, "importing cachescope imported torch"
print(f"cachescope {cachescope.__version__} imports on {sys.version.split()[0]} without torch")
'

# newest installed X.Y.Z for X.Y under pyenv, or nothing
find_python() {
    local found="" dir
    for dir in "$PYENV_VERSIONS/$1".[0-9]*; do
        case ${dir##*/} in *[!0-9.]*) continue ;; esac   # skip 3.13.0t, 3.12-dev, ...
        [ -x "$dir/bin/python3" ] && found+="$dir"$'\n'
    done
    [ -n "$found" ] && printf '%s' "$found" | sort -V | tail -n 1 | sed 's|$|/bin/python3|'
}

# run "$@" with a time limit where coreutils' timeout exists
limited() {
    if command -v timeout >/dev/null 2>&1; then timeout "$TEST_TIMEOUT" "$@"; else "$@"; fi
}

# run_version VERSION PYTHON VENV LOG: set up VENV from PYTHON and run the checks, logging to
# LOG. On success HOW says whether the venv was created or reused; on failure FAILED_STEP says
# which step failed.
run_version() {
    local version=$1 base=$2 venv=$3 log=$4 py stamp want how="reused"
    py=$venv/bin/python
    stamp=$venv/.cachescope-deps
    want="$("$base" -c 'import os, sys; print(os.path.realpath(sys.executable), sys.version.split()[0])') ${DEPS[*]}"
    # 1. the virtual environment (recreated when the interpreter or the dependency list changed)
    if [ ! -x "$py" ] || ! "$py" -c 'pass' >/dev/null 2>&1 || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        how="created"
        rm -rf "$venv"
        echo "== $venv: creating with $base" >>"$log"
        "$base" -m venv "$venv" >>"$log" 2>&1 || { FAILED_STEP="venv"; return 1; }
        "$py" -m pip install --quiet --disable-pip-version-check "${DEPS[@]}" >>"$log" 2>&1 \
            || { FAILED_STEP="pip install (test dependencies)"; return 1; }
        printf '%s' "$want" >"$stamp"
    fi
    # 2. the package, built from this tree on this interpreter (always: cheap, and it is the check)
    echo "== $venv: pip install --no-deps --no-build-isolation -e ." >>"$log"
    "$py" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
        -e "$ROOT" >>"$log" 2>&1 || { FAILED_STEP="build + install"; return 1; }
    if "$py" -c 'import torch' >/dev/null 2>&1; then
        echo "torch is installed in $venv: these tests must run without it" >>"$log"
        FAILED_STEP="no-torch check"; return 1
    fi
    # 3. smoke import, from outside the tree (the installed package, not the working directory)
    echo "== smoke import" >>"$log"
    (cd "${TMPDIR:-/tmp}" && CACHESCOPE_ROOT=$ROOT "$py" -c "$SMOKE") >>"$log" 2>&1 \
        || { FAILED_STEP="smoke import"; return 1; }
    # 4. the tests that need no torch
    echo "== python -m pytest -q -p no:cacheprovider tests/test_portable.py" >>"$log"
    limited "$py" -m pytest -q -p no:cacheprovider tests/test_portable.py >>"$log" 2>&1 \
        || { FAILED_STEP="pytest"; return 1; }
    HOW=$how
    return 0
}

failures=0
results=()
for version in "${VERSIONS[@]}"; do
    started=$SECONDS
    venv=$ROOT/.venv-py${version//./}
    label="CPython $version"
    base=$(find_python "$version")
    if [ -z "$base" ]; then
        if [ "${CI:-}" = "true" ]; then
            line="FAIL  $label: no interpreter under $PYENV_VERSIONS/$version.* (CI=true: required)"
            failures=$((failures + 1))
        else
            line="SKIP  $label: no interpreter under $PYENV_VERSIONS/$version.*"
        fi
        echo "$line"; results+=("$line"); continue
    fi
    label="CPython $("$base" -c 'import sys; print(sys.version.split()[0])')"
    log=$(mktemp "${TMPDIR:-/tmp}/cachescope-py${version//./}.XXXXXX.log")
    FAILED_STEP="" HOW=""
    if run_version "$version" "$base" "$venv" "$log"; then
        summary=$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed).* =+$' "$log" | tail -n 1 | tr -d '=')
        line="PASS  $label: $(echo $summary) (venv ${HOW}, $((SECONDS - started)) s)"
        rm -f "$log"
    else
        failures=$((failures + 1))
        line="FAIL  $label: $FAILED_STEP failed after $((SECONDS - started)) s (log: $log)"
        echo "---- last lines of $log"
        tail -n 80 "$log"
        echo "----"
    fi
    echo "$line"; results+=("$line")
done

echo
echo "cachescope on other Pythons (tests/test_portable.py, no torch):"
printf '  %s\n' "${results[@]}"
[ "$failures" -eq 0 ]
