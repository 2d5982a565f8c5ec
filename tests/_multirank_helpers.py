"""Shared helpers for tests that run the multi-rank ``cachescope run`` as a subprocess."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 240
SERVING = re.compile(r"cachescope: serving metrics on http://127\.0\.0\.1:(\d+)/metrics "
                     r"\(rank (\d+), tp_rank (\d+), pp_rank (\d+)\)")


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


def _stop(proc: subprocess.Popen[str]) -> None:
    """End a launch that a failed assertion left running: two SIGINTs make cachescope stop every
    rank (a SIGKILL of the parent alone would leave the launcher's processes to the kernel)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=60)


def _read_until(proc: subprocess.Popen[str], pattern: str, timeout: float) -> str:
    """stderr of ``proc`` up to the first line matching ``pattern``."""
    assert proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if sel.select(timeout=1):
            line = proc.stderr.readline()
            seen += line
            if re.search(pattern, line):
                return seen
    raise AssertionError(f"no line matching {pattern!r}; stderr so far: {seen!r}")
