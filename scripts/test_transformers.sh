#!/usr/bin/env bash
# Run the Hugging Face tests against the OLDEST transformers the tests are kept working on, so
# that cachescope.hf's "supported" range is tested, not only checked by hand:
#   bash scripts/test_transformers.sh            -> transformers 5.18.0 (TRANSFORMERS_PIN below)
#
# A virtual environment .venv-transformers-min on CPython 3.11 (the newest ~/.pyenv/versions/3.11.*
# or python3.11 on PATH; torch's CPU wheel on disk is for 3.11) is created, or reused while its
# interpreter and pins are unchanged. Into it: torch==2.13.0 FIRST (the CPU build; a bare `torch`
# or a range would pull a multi-GB CUDA build), then the test dependencies the HF tests need and
# transformers==5.18.0 with a constraints file that holds torch where it is (pip may add what
# transformers needs, never change torch), then cachescope itself, built from this tree with
# `pip install --no-deps -e .`. Then tests/test_hf_cache.py, tests/test_hf_faults.py and
# tests/test_testing_hf.py run on it, with the caller's CI passed through (CI=true: a test that
# skips for something missing fails, in a test or at collection: tests/_ci.py). A run that
# skips anything at all, or runs no test, fails too. Exit status non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=$ROOT/.venv-transformers-min
PY=$VENV/bin/python
PYENV_VERSIONS=${PYENV_ROOT:-$HOME/.pyenv}/versions
PYTHON_VERSION=3.11
TORCH_PIN="torch==2.13.0"
TRANSFORMERS_PIN="transformers==5.18.0"
# As the main venv (.venv) has them; safetensors and the rest come with transformers.
DEPS=(
    "prometheus-client==0.26.0"
    "opentelemetry-api==1.45.2"
    "opentelemetry-sdk==1.45.2"
    "pytest==9.2.0"
    "setuptools>=70.1"
)
TESTS=(tests/test_hf_cache.py tests/test_hf_faults.py tests/test_testing_hf.py)
TEST_TIMEOUT=${TEST_TIMEOUT:-600}
PIP=(-m pip install --quiet --disable-pip-version-check)

started=$SECONDS
log=$(mktemp "${TMPDIR:-/tmp}/cachescope-transformers-min.XXXXXX.log")
fail() {
    echo "FAIL  transformers-min: $1 after $((SECONDS - started)) s (log: $log)" >&2
    echo "---- last lines of $log" >&2
    tail -n 60 "$log" >&2
    exit 1
}

# 1. the interpreter: newest pyenv 3.11.x, else python3.11
base=""
for dir in "$PYENV_VERSIONS/$PYTHON_VERSION".[0-9]*; do
    case ${dir##*/} in *[!0-9.]*) continue ;; esac   # skip 3.11.0t, 3.11-dev, ...
    [ -x "$dir/bin/python3" ] && base=$(printf '%s\n%s' "$base" "$dir/bin/python3")
done
base=$(printf '%s\n' "$base" | sed '/^$/d' | sort -V | tail -n 1)
[ -n "$base" ] || base=$(command -v "python$PYTHON_VERSION" || true)
[ -n "$base" ] || fail "no CPython $PYTHON_VERSION (under $PYENV_VERSIONS/$PYTHON_VERSION.* or on PATH)"

# 2. the virtual environment, recreated when the interpreter or a pin changed
interp=$("$base" -c 'import os, sys; print(os.path.realpath(sys.executable), sys.version.split()[0])') \
    || fail "$base does not run"
want="$interp $TORCH_PIN $TRANSFORMERS_PIN ${DEPS[*]}"
stamp=$VENV/.cachescope-deps
how="reused"
if [ ! -x "$PY" ] || ! "$PY" -c 'pass' >/dev/null 2>&1 || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    how="created"
    rm -rf "$VENV"
    echo "== $VENV: creating with $base" >>"$log"
    "$base" -m venv "$VENV" >>"$log" 2>&1 || fail "venv"
    printf '%s\n%s\n' "$TORCH_PIN" "$TRANSFORMERS_PIN" >"$VENV/constraints.txt"
    echo "== pip install $TORCH_PIN" >>"$log"
    "$PY" "${PIP[@]}" "$TORCH_PIN" >>"$log" 2>&1 || fail "pip install $TORCH_PIN"
    echo "== pip install -c constraints.txt ${DEPS[*]} $TRANSFORMERS_PIN" >>"$log"
    "$PY" "${PIP[@]}" -c "$VENV/constraints.txt" "${DEPS[@]}" "$TRANSFORMERS_PIN" >>"$log" 2>&1 \
        || fail "pip install (test dependencies, $TRANSFORMERS_PIN)"
    "$PY" -m pip freeze --all >>"$log" 2>&1 || true
    printf '%s' "$want" >"$stamp"
fi
setup_s=$((SECONDS - started))

# 3. cachescope, built from this tree (always: cheap, and it is the check)
echo "== pip install --no-deps --no-build-isolation -e ." >>"$log"
"$PY" "${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT" >>"$log" 2>&1 || fail "build + install"

# 4. what will run: the pinned torch (CPU build) and transformers, the tree's cachescope
versions=$(cd "${TMPDIR:-/tmp}" && CACHESCOPE_ROOT=$ROOT "$PY" -c '
import os, sys, torch, transformers, cachescope
root = os.path.realpath(os.environ["CACHESCOPE_ROOT"])
assert os.path.realpath(cachescope.__file__).startswith(root + os.sep), cachescope.__file__
assert torch.__version__.split("+")[0] == sys.argv[1], f"torch {torch.__version__}, want {sys.argv[1]}"
assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"
assert transformers.__version__ == sys.argv[2], f"transformers {transformers.__version__}, want {sys.argv[2]}"
print(f"transformers {transformers.__version__}, torch {torch.__version__}, Python {sys.version.split()[0]}")
' "${TORCH_PIN#torch==}" "${TRANSFORMERS_PIN#transformers==}" 2>>"$log") || fail "version check"
echo "transformers-min: $versions (venv $how, set-up $setup_s s); CI=${CI:-<unset>}"

# 5. the HF tests
limited() {
    if command -v timeout >/dev/null 2>&1; then timeout "$TEST_TIMEOUT" "$@"; else "$@"; fi
}
tests_started=$SECONDS
out=$(mktemp "${TMPDIR:-/tmp}/cachescope-transformers-min-pytest.XXXXXX.log")
echo "== python -m pytest -q -p no:randomly -p no:cacheprovider ${TESTS[*]}"
status=0
limited "$PY" -m pytest -q -p no:randomly -p no:cacheprovider "${TESTS[@]}" 2>&1 | tee "$out" \
    || status=$?
cat "$out" >>"$log"
summary=$(grep -E '^=* ?[0-9]+ (passed|failed|skipped|error|errors|deselected|xfailed|xpassed)' "$out" \
          | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//' || true)
rm -f "$out"
tests_s=$((SECONDS - tests_started))
[ "$status" -eq 0 ] || fail "pytest (exit $status: ${summary:-no summary})"
case $summary in
    *failed*|*skipped*|*deselected*|*xfailed*|*xpassed*|*error*) fail "pytest: not every test ran and passed ($summary)" ;;
    *passed*) ;;
    *) fail "pytest: no test passed (${summary:-no summary})" ;;
esac
rm -f "$log"
echo "PASS  transformers-min: $summary on $versions (venv $how; set-up $setup_s s, tests $tests_s s, total $((SECONDS - started)) s)"
