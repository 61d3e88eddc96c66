"""weightshare/proto_time.py: Duration / Timestamp from and to seconds, validation of client Durations, and
reading a time a peer sent twice (Duration, else the deprecated double). Protobuf only, milliseconds.
Run as: .venv/bin/python -m pytest tests/test_proto_time.py -v
"""

from __future__ import annotations

import math

import pytest
from google.protobuf.duration_pb2 import Duration

from weightshare import proto_time
from weightshare.v1 import trainer_service_pb2 as tpb
from weightshare.v1 import weight_export_service_pb2 as pb


@pytest.mark.parametrize("seconds", [0.0, 1e-9, 0.6, 2.5, 30.0, 86_400.123456789, -1.5])
def test_duration_round_trips_to_the_nanosecond(seconds):
    d = proto_time.duration(seconds)
    assert proto_time.duration_problem(d) is None
    assert proto_time.seconds(d) == pytest.approx(seconds, abs=1e-9)


def test_duration_refuses_what_no_duration_holds():
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="not a finite duration"):
            proto_time.duration(bad)


def test_timestamp_is_the_unix_time():
    ts = proto_time.timestamp(1_790_000_000.25)
    assert (ts.seconds, ts.nanos) == (1_790_000_000, 250_000_000)
    assert proto_time.seconds(ts) == 1_790_000_000.25


def test_duration_problems_are_named():
    assert "beyond" in proto_time.duration_problem(Duration(seconds=proto_time.MAX_DURATION_SECONDS + 1))
    assert "nanos" in proto_time.duration_problem(Duration(nanos=-(10**9)))
    assert "differ in sign" in proto_time.duration_problem(Duration(seconds=-1, nanos=5))
    assert proto_time.duration_problem(Duration(seconds=-1, nanos=-5)) is None
    assert proto_time.shown(Duration(seconds=3, nanos=4)) == "{seconds: 3, nanos: 4}"


def test_seconds_of_prefers_the_duration_and_falls_back_to_the_double():
    old_server = pb.UpdateWeightsResponse(paused_seconds=0.25)  # before paused_duration existed
    assert proto_time.seconds_of(old_server, "paused_duration", "paused_seconds") == 0.25
    both = pb.UpdateWeightsResponse(paused_seconds=0.25, paused_duration=proto_time.duration(0.5))
    assert proto_time.seconds_of(both, "paused_duration", "paused_seconds") == 0.5
    step = tpb.StreamProgressResponse(step_duration=proto_time.duration(1.5))
    assert proto_time.seconds_of(step, "step_duration", "step_seconds") == 1.5
