"""Waiting for a forked child inside the tests' subprocess scripts (``run_py`` puts tests/ on their path).

Only the standard library: the fork tests check what importing the package starts, so this must not import it."""

from __future__ import annotations

import os
import sys
import time


def wait_child(pid: int, seconds: float = 60.0) -> int:
    """The wait status of the forked child ``pid``. A child still running after ``seconds`` is killed, and the
    script prints "child hung" and exits 1: a hang fails the test, never blocks it."""
    for _ in range(round(seconds / 0.1)):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.1)
    os.kill(pid, 9)
    print("child hung", flush=True)
    sys.exit(1)
