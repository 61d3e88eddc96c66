"""A progress bar for `weightshare train` on a terminal: examples trained of those submitted, step, loss, ETA.

Fed with the loop's progress events (the same ones StreamProgress sends); off a terminal the JSON
step logs say the same. Log lines are printed above the bar (weightshare.logs routes them through
`tqdm.write` on a terminal), so the two never garble each other.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

from weightshare import proto_time
from weightshare.v1 import trainer_service_pb2 as pb


class TerminalProgress:
    def __init__(self, trained: int, pending: int, file: TextIO | None = None):
        self._bar = tqdm(
            total=trained + pending, initial=trained, unit="example", desc="training", dynamic_ncols=True,
            file=file or sys.stderr, bar_format="{desc}: {n_fmt}/{total_fmt} examples |{bar}| [{elapsed}<{remaining}]"
            "{postfix}",  # tqdm puts ", " before the postfix
        )
        self._trained = trained

    def on_event(self, event: pb.StreamProgressResponse, trained: int) -> None:
        """`trained`: examples trained so far (the store's cursor) when `event` was published."""
        self._bar.total = trained + event.pending_examples
        self._bar.update(trained - self._trained)
        self._trained = trained
        if event.kind == pb.PROGRESS_KIND_STEP:
            self._bar.set_postfix_str(
                f"step {event.step} loss {event.loss:.4f} v{event.weights_version} paused "
                f"{proto_time.seconds(event.paused_duration):.2f}s",
                refresh=False,
            )
        elif event.kind in (pb.PROGRESS_KIND_SKIPPED, pb.PROGRESS_KIND_STOPPED):
            self._bar.set_postfix_str(f"{pb.ProgressKind.Name(event.kind).removeprefix('PROGRESS_KIND_').lower()}: "
                                      f"{event.message}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()
