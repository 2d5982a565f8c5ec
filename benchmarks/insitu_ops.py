#!/usr/bin/env python
"""Time each C fast-path op inside a real decode, with the CPU's time-stamp counter.

Wall-clock differences of 10-20 us/token are below this VM's run-to-run noise, and a timeit loop
runs the ops warm, which a decode step never does. This builds a throw-away copy of the package
whose ``FastOp`` dispatcher reads the TSC around every op (x86-64, CPython 3.11, gcc), runs
``generate`` on it and prints each op's mean cost in situ. Nothing in the repository changes.

    python benchmarks/insitu_ops.py [PRESET] [TOKENS] [REPS]
    python benchmarks/insitu_ops.py tiny 64 30
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPS = ("push", "pop", "get", "set", "end_step", "clear")   # FastOp kinds 0..5

_PATCHES = [
    ("#include <time.h>",
     "#include <time.h>\n#include <x86intrin.h>\nstatic unsigned long long tsc_acc[6], tsc_n[6];"),
    ("            Py_INCREF(hot);\n            PyObject *r = op->kind == 0",
     "            Py_INCREF(hot);\n            unsigned long long t0 = __rdtsc();\n"
     "            PyObject *r = op->kind == 0"),
    ("            Py_DECREF(hot);\n            return r;",
     "            tsc_acc[op->kind] += __rdtsc() - t0;\n            tsc_n[op->kind]++;\n"
     "            Py_DECREF(hot);\n            return r;"),
    ("static PyMethodDef module_methods[] = {",
     "static PyObject *tsc_now(PyObject *m, PyObject *a)\n"
     "{ return PyLong_FromUnsignedLongLong(__rdtsc()); }\n"
     "static PyObject *tsc_take(PyObject *m, PyObject *a)\n"
     "{\n    PyObject *r = PyList_New(0);\n    for (int i = 0; r && i < 6; i++) {\n"
     "        PyObject *t = Py_BuildValue(\"(KK)\", tsc_acc[i], tsc_n[i]);\n"
     "        if (!t || PyList_Append(r, t) < 0) { Py_XDECREF(t); Py_CLEAR(r); break; }\n"
     "        Py_DECREF(t);\n        tsc_acc[i] = tsc_n[i] = 0;\n    }\n    return r;\n}\n"
     "static PyMethodDef module_methods[] = {\n"
     "    {\"_tsc_now\", tsc_now, METH_NOARGS, NULL},\n"
     "    {\"_tsc_take\", tsc_take, METH_NOARGS, NULL},"),
]

_RUN = r'''
import sys, time, torch
from prometheus_client import CollectorRegistry
from cachescope import InstrumentedCache, _speedups as S
from cachescope.neox import NeoXConfig, NeoXModel, generate
preset, tokens, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
a, ta = S._tsc_now(), time.perf_counter(); time.sleep(0.5); b, tb = S._tsc_now(), time.perf_counter()
hz = (b - a) / (tb - ta)
model = NeoXModel(NeoXConfig.preset(preset)).eval()
cache = InstrumentedCache(registry=CollectorRegistry())
assert cache.speedups_active, "the C fast path is not active"
with torch.inference_mode():
    generate(model, list(range(16)), 4, cache=cache)
    S._tsc_take()
    t0 = time.perf_counter()
    for _ in range(reps):
        generate(model, list(range(16)), tokens, cache=cache)
    wall = time.perf_counter() - t0
n = tokens * reps
print(f"{preset}: {wall / n * 1e6:.0f} us/token; TSC {hz / 1e9:.2f} GHz")
print(f"  {'op':9s} {'per token':>9s} {'us/op':>7s} {'us/token':>9s}")
total = 0.0
for name, (cycles, count) in zip(''' + repr(OPS) + r''', S._tsc_take()):
    if count:
        per_token = cycles / hz / n * 1e6
        total += per_token
        print(f"  {name:9s} {count / n:9.1f} {cycles / count / hz * 1e6:7.2f} {per_token:9.1f}")
print(f"  {'all ops':9s} {'':9s} {'':7s} {total:9.1f}")
'''


def build(dest: Path) -> None:
    pkg = dest / "cachescope"
    shutil.copytree(ROOT / "cachescope", pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    src = (ROOT / "cachescope" / "_speedups.c").read_text()
    for old, new in _PATCHES:
        if old not in src:
            raise SystemExit(f"insitu_ops: _speedups.c changed; update the patch for {old[:40]!r}")
        src = src.replace(old, new, 1)
    (pkg / "_speedups.c").write_text(src)
    out = pkg / ("_speedups" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = ["gcc", "-O3", "-fwrapv", "-DNDEBUG", "-fPIC", "-shared",
           f"-I{sysconfig.get_paths()['include']}", str(pkg / "_speedups.c"), "-o", str(out)]
    subprocess.run(cmd, check=True)


def main(argv: list[str]) -> int:
    preset = argv[0] if argv else "tiny"
    tokens = argv[1] if len(argv) > 1 else "64"
    reps = argv[2] if len(argv) > 2 else "30"
    with tempfile.TemporaryDirectory(prefix="cachescope-insitu-") as tmp:
        build(Path(tmp))
        env = dict(os.environ, PYTHONPATH=tmp)
        env.pop("CACHESCOPE_PURE_PYTHON", None)
        return subprocess.run([sys.executable, "-c", _RUN, preset, tokens, reps], env=env,
                              cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
