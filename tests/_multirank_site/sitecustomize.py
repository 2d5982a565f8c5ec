"""Test helper for tests/test_multirank_cli.py: kills one rank of a run with SIGKILL, the way the
kernel's OOM killer or a segfault would end it (no Python cleanup, no exit status of its own).

Put this directory on PYTHONPATH and set CACHESCOPE_TEST_KILL_RANK=R: the process whose RANK is R
kills itself half a second after its InstrumentedCache is installed (the rank is decoding then).
Every other process (the launcher, the other ranks) is left alone.
"""

import os
import signal
import sys
import threading
import time


def _kill_when_decoding() -> None:
    while True:
        cachescope = sys.modules.get("cachescope")
        installed = getattr(cachescope, "installed", None)
        if installed is not None and installed() is not None:
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.05)


if os.environ.get("RANK") is not None and \
        os.environ.get("RANK") == os.environ.get("CACHESCOPE_TEST_KILL_RANK"):
    threading.Thread(target=_kill_when_decoding, name="test-kill-rank", daemon=True).start()
