"""Shared helpers for tests that run the multi-rank ``cachescope run`` as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 240


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in (extra.pop("PYTHONPATH", ""),
                                                                   env.get("PYTHONPATH", "")) if p])
    env.update(extra)
    return env


def _launch(*args: str, cwd: Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cachescope", "run", *args], cwd=cwd,
                          env=_env(**extra_env), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)


def _processes_with(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (a run's unique argument)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if marker in cmd and state != "Z":
            out.append(f"{entry.name}: {cmd}")
    return out


def _no_leftovers(marker: str) -> list[str]:
    deadline = time.monotonic() + 5
    left = _processes_with(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _processes_with(marker)
    return left
