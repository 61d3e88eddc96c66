"""The terminal progress bar of `weightshare train`, fed with the loop's progress events.

Run as: .venv/bin/python -m pytest tests/test_progress_bar.py -q
"""

from __future__ import annotations

import io

from trainer_side.progress_bar import TerminalProgress
from weightshare.v1 import trainer_service_pb2 as pb


def test_bar_follows_steps_and_new_submissions():
    out = io.StringIO()
    bar = TerminalProgress(trained=0, pending=4, file=out)
    bar.on_event(pb.StreamProgressResponse(kind=pb.PROGRESS_KIND_STEP, step=1, loss=2.5, weights_version=1,
                                           pending_examples=2), trained=2)
    assert "2/4 examples" in out.getvalue() and "step 1 loss 2.5000 v1" in out.getvalue()
    # More examples submitted meanwhile: the total grows.
    bar.on_event(pb.StreamProgressResponse(kind=pb.PROGRESS_KIND_STEP, step=2, loss=1.25, weights_version=2,
                                           pending_examples=6), trained=4)
    assert "4/10 examples" in out.getvalue() and "step 2 loss 1.2500 v2" in out.getvalue()
    bar.on_event(pb.StreamProgressResponse(kind=pb.PROGRESS_KIND_STOPPED, step=2, pending_examples=6,
                                           message="stopped on request"), trained=4)
    assert "stopped: stopped on request" in out.getvalue()
    bar.close()
