"""Run torch's launcher (``python -m torch.distributed.run``) for a test and leave nothing behind.

Torch's launcher starts every rank in a session of its own, so killing the launcher's process
group does not reach the ranks: on a timeout (or any error while waiting) the ranks are found
among the launcher's descendants first, then the launcher's group and each of them is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Sequence

from cachescope._multirank import descendants


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher started with ``start_new_session=True`` and every process under it."""
    ranks = descendants(proc.pid)            # before the launcher dies and they are re-parented
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    proc.wait()


def torchrun(args: Sequence[str], *, env: dict | None = None,
             timeout: float = 240) -> tuple[int | None, str]:
    """``python -m torch.distributed.run ARGS``: (exit status, stdout+stderr). On a timeout the
    whole tree is killed and the status is None."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except BaseException as exc:
        kill_tree(proc)
        out, _ = proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            return None, out
        raise
