"""Fault injection for the reliability suite: `WEIGHTSHARE_FAILPOINT=NAME` SIGKILLs the process at NAME.

`WEIGHTSHARE_FAILPOINT=NAME:stop` SIGSTOPs it there instead (every thread, heartbeats included, freezes
until a SIGCONT): a trainer the OS, a debugger or a long pause left silent past the server's limit. With
`WEIGHTSHARE_FAILPOINT_RELEASE=PATH` it stops again after any SIGCONT until PATH exists: a stray SIGCONT
(e.g. the kernel's SIGCONT to a process group that becomes orphaned while stopped) cannot end the
freeze early.

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
RELEASE_ENV = "WEIGHTSHARE_FAILPOINT_RELEASE"
POINTS = ("attach", "forward", "paused", "mid_write", "commit")
_ARMED, _, _ACTION = os.environ.get(ENV, "").partition(":")
_fired = False


def failpoint(name: str) -> None:
    """Dies here (SIGKILL), or stops once (SIGSTOP, with `:stop`), if `name` is the armed point."""
    global _fired
    if _ARMED != name:
        return
    if _ACTION == "stop":
        if not _fired:
            _fired = True
            release = os.environ.get(RELEASE_ENV)
            os.kill(os.getpid(), signal.SIGSTOP)
            while release and not os.path.exists(release):
                os.kill(os.getpid(), signal.SIGSTOP)
        return
    os.kill(os.getpid(), signal.SIGKILL)
