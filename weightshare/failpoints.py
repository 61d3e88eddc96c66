"""Fault injection for the reliability suite: `WEIGHTSHARE_FAILPOINT=NAME` SIGKILLs the process at NAME.

A SIGKILL runs no handler, no `finally` and no atexit: exactly what a crash, the OOM killer or a power
cut leaves behind. The points (tests/test_faults.py kills a trainer at each):
- `attach`: the session is open on the inference side, handles not yet streamed;
- `forward`: the step's loss is computed, nothing paused or written;
- `paused`: the update is begun (strict mode: vLLM paused), nothing written yet;
- `mid_write`: some parameters of the step are updated, others not (fused steps);
- `commit`: every write of the step is done, the commit not sent.
Unset, each point costs one string comparison.
"""

from __future__ import annotations

import os
import signal

ENV = "WEIGHTSHARE_FAILPOINT"
POINTS = ("attach", "forward", "paused", "mid_write", "commit")
_ARMED = os.environ.get(ENV, "")


def failpoint(name: str) -> None:
    """Dies here (SIGKILL) if `name` is the armed point."""
    if _ARMED == name:
        os.kill(os.getpid(), signal.SIGKILL)
