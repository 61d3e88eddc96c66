"""Times in the contract: `google.protobuf.Duration` / `Timestamp` beside the deprecated `double` seconds.

The contract carries each time twice while clients move over (protos/weightshare/v1): servers fill both
the deprecated double and its well-known-type twin; a request field is read from its Duration when set,
else from its double. These helpers build the well-known types from seconds and read them back, and
check a Duration a client sent (range and sign, as google/protobuf/duration.proto defines them).
Protobuf only: no torch, no vLLM.
"""

from __future__ import annotations

import math

from google.protobuf import duration_pb2, timestamp_pb2

NANOS_PER_SECOND = 1_000_000_000
MAX_DURATION_SECONDS = 315_576_000_000  # google/protobuf/duration.proto: about 10,000 years


def _nanoseconds(seconds: float) -> int:
    """`seconds` in whole nanoseconds; whole seconds apart from the fraction, so large values (unix times)
    lose nothing to the float product."""
    whole = math.floor(seconds)
    return whole * NANOS_PER_SECOND + round((seconds - whole) * NANOS_PER_SECOND)


def duration(seconds: float) -> duration_pb2.Duration:
    """`seconds` (finite) as a Duration, to the nanosecond."""
    if not math.isfinite(seconds):
        raise ValueError(f"{seconds} seconds is not a finite duration")
    result = duration_pb2.Duration()
    result.FromNanoseconds(_nanoseconds(seconds))
    return result


def timestamp(unix_seconds: float) -> timestamp_pb2.Timestamp:
    """A unix time in seconds (time.time()) as a Timestamp, to the nanosecond."""
    result = timestamp_pb2.Timestamp()
    result.FromNanoseconds(_nanoseconds(unix_seconds))
    return result


def seconds(value: duration_pb2.Duration | timestamp_pb2.Timestamp) -> float:
    """A Duration's length, or a Timestamp's unix time, in seconds."""
    return value.seconds + value.nanos / NANOS_PER_SECOND


def duration_problem(value: duration_pb2.Duration) -> str | None:
    """Why `value` is not a valid Duration (out of range, nanos out of range or of the other sign), or None."""
    if abs(value.seconds) > MAX_DURATION_SECONDS:
        return f"seconds {value.seconds} is beyond +-{MAX_DURATION_SECONDS}"
    if abs(value.nanos) >= NANOS_PER_SECOND:
        return f"nanos {value.nanos} is beyond +-999999999"
    if (value.seconds < 0 < value.nanos) or (value.nanos < 0 < value.seconds):
        return f"seconds {value.seconds} and nanos {value.nanos} differ in sign"
    return None


def shown(value: duration_pb2.Duration) -> str:
    """A Duration as a client wrote it, for error messages: '{seconds: S, nanos: N}'."""
    return f"{{seconds: {value.seconds}, nanos: {value.nanos}}}"


def seconds_of(message, duration_field: str, seconds_field: str) -> float:
    """A time a peer sent twice, in seconds: its Duration field when set, else the deprecated double (a peer
    from before the Duration fields sends only that)."""
    if message.HasField(duration_field):
        return seconds(getattr(message, duration_field))
    return getattr(message, seconds_field)
