"""The update protocol's state machine with a fake engine: milliseconds, no vLLM.

The fake records pause / resume / prefix-cache resets, so every transition can be checked: begin,
commit, abort (trainer, silence, stream broken, shutdown), heartbeats, torn weights, per-update ids.
Run as: .venv/bin/python -m pytest tests/test_updates.py -v
"""

from __future__ import annotations

import asyncio

import pytest

from inference_side.updates import UpdateCoordinator, UpdateError, event_kind_name, max_pause_of
from weightshare import proto_time
from weightshare.v1 import update_mode_pb2
from weightshare.v1 import weight_export_service_pb2 as pb


class FakeEngine:
    def __init__(self):
        self.calls: list[str] = []
        self.paused = False

    async def pause_generation(self, mode: str, clear_cache: bool) -> None:
        self.calls.append(f"pause:{mode}")
        self.paused = True

    async def resume_generation(self) -> None:
        self.calls.append("resume")
        self.paused = False

    async def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        self.calls.append("reset")
        return True


def run(coro):
    return asyncio.run(coro)


def test_begin_commit_bumps_version_resets_cache_and_resumes():
    async def scenario():
        engine = FakeEngine()
        c = UpdateCoordinator(engine, update_mode_pb2.UPDATE_MODE_STRICT)
        begun = await c.begin("s", 1, 0)
        assert begun.phase == pb.UPDATE_PHASE_BEGUN and engine.paused and c.paused
        done = await c.commit("s", 1)
        assert done.weights_version == 1 and not done.weights_torn
        assert engine.calls == ["pause:keep", "reset", "resume"] and not c.in_progress

    run(scenario())


def test_abort_after_possible_writes_flags_torn_until_the_next_commit():
    async def scenario():
        engine = FakeEngine()
        c = UpdateCoordinator(engine)
        await c.begin("s", 3, 0)
        aborted = await c.abort("s", "optimizer failed")
        assert aborted.phase == pb.UPDATE_PHASE_ABORTED and aborted.weights_torn
        assert (c.stats.weights_torn, c.stats.torn_step, c.stats.weights_version) == (True, 3, 0)
        assert engine.calls == ["pause:keep", "reset", "resume"]  # cache dropped while still paused
        assert "weights_may_be_torn" in [e.kind for e in c.stats.events]
        await c.begin("s", 4, 0)
        assert (await c.commit("s", 4)).weights_torn is False and not c.stats.weights_torn

    run(scenario())


def test_abort_with_untouched_weights_keeps_them_trusted():
    async def scenario():
        engine = FakeEngine()
        c = UpdateCoordinator(engine)
        await c.begin("s", 1, 0)
        aborted = await c.abort("s", "nothing to do", weights_untouched=True)
        assert not aborted.weights_torn and engine.calls == ["pause:keep", "resume"]

    run(scenario())


def test_heartbeats_keep_a_long_step_alive_and_silence_aborts_it():
    async def scenario():
        engine = FakeEngine()
        c = UpdateCoordinator(engine)
        await c.begin("s", 1, 0.2)
        for _ in range(6):  # 0.3 s of work, longer than the 0.2 s limit, with heartbeats
            await asyncio.sleep(0.05)
            await c.heartbeat("s", 1)
        assert c.in_progress and engine.paused
        await asyncio.sleep(0.4)  # silence
        assert not c.in_progress and not engine.paused and c.stats.weights_torn
        assert "pause_timeout" in [e.kind for e in c.stats.events]
        with pytest.raises(UpdateError, match="begin first"):
            await c.commit("s", 1)

    run(scenario())


def test_stale_heartbeats_are_ignored():
    async def scenario():
        c = UpdateCoordinator(FakeEngine())
        await c.heartbeat("s", 1)  # no update open: nothing happens
        await c.begin("s", 2, 0)
        await c.heartbeat("other", 2)
        await c.heartbeat("s", 1)
        assert c.in_progress

    run(scenario())


def test_late_cleanup_of_an_old_stream_never_aborts_a_newer_update():
    async def scenario():
        engine = FakeEngine()
        c = UpdateCoordinator(engine)
        await c.begin("s", 1, 0)
        old_id = c.current_update_id
        await c.commit("s", 1)
        await c.begin("s", 2, 0)  # the trainer reopened its stream and began again
        assert not await c.abandon("s", "old stream ended", old_id)
        assert c.in_progress
        assert await c.abandon("s", "new stream ended", c.current_update_id)
        assert not c.in_progress and c.stats.weights_torn and not engine.paused

    run(scenario())


def test_shutdown_and_concurrent_mode():
    async def scenario():
        engine = FakeEngine()
        c = UpdateCoordinator(engine, update_mode_pb2.UPDATE_MODE_CONCURRENT)
        begun = await c.begin("s", 1, 0)
        assert begun.pause_wait_seconds == 0 and not engine.paused and "pause:keep" not in engine.calls
        await c.shutdown()
        assert not c.in_progress and c.stats.weights_torn
        assert "server_shutdown" in [e.kind for e in c.stats.events]

    run(scenario())


def test_protocol_refusals_name_the_problem():
    async def scenario():
        c = UpdateCoordinator(FakeEngine())
        for bad in (-1.0, float("nan"), float("inf")):  # NaN once disabled the watchdog and spun it
            with pytest.raises(UpdateError, match="must be a finite number") as info:
                await c.begin("s", 1, bad)
            assert info.value.code_name == "INVALID_ARGUMENT"
        assert not c.paused
        await c.begin("s", 1, 0)
        with pytest.raises(UpdateError, match="still open"):
            await c.begin("t", 2, 0)
        with pytest.raises(UpdateError, match="another trainer"):
            await c.commit("t", 1)
        with pytest.raises(ValueError, match="neither STRICT nor CONCURRENT"):
            UpdateCoordinator(FakeEngine(), 7)

    run(scenario())


def test_events_carry_their_kind_as_enum_and_string_and_their_time_twice():
    async def scenario():
        c = UpdateCoordinator(FakeEngine())
        await c.begin("s", 1, 0)
        await c.abandon("s", "stream ended")
        kinds = [(e.event_kind, e.kind) for e in c.stats.events]
        assert kinds == [
            (pb.EXPORT_EVENT_KIND_WEIGHTS_MAY_BE_TORN, "weights_may_be_torn"),
            (pb.EXPORT_EVENT_KIND_STREAM_BROKEN_WHILE_PAUSED, "stream_broken_while_paused"),
        ]
        for e in c.stats.events:
            assert e.HasField("time") and abs(proto_time.seconds(e.time) - e.unix_time) < 1e-6

    run(scenario())


def test_every_event_kind_name_is_its_deprecated_string():
    strings = {event_kind_name(v) for v in pb.ExportEventKind.values() if v != pb.EXPORT_EVENT_KIND_UNSPECIFIED}
    # Every string the server has ever sent in ExportEvent.kind has an enum value, and no other.
    assert strings == {
        "weights_may_be_torn", "weights_consistent", "prefix_cache_not_reset", "stream_broken_while_paused",
        "stream_broken", "pause_timeout", "server_shutdown", "trainer_gone", "writer_taken_over",
    }


def test_acknowledgements_carry_durations_equal_to_the_seconds():
    async def scenario():
        c = UpdateCoordinator(FakeEngine())
        begun = await c.begin("s", 1, 0)
        assert begun.HasField("pause_wait_duration")
        assert proto_time.seconds(begun.pause_wait_duration) == pytest.approx(begun.pause_wait_seconds, abs=1e-9)
        await asyncio.sleep(0.01)
        committed = await c.commit("s", 1)
        assert committed.paused_seconds > 0
        assert proto_time.seconds(committed.paused_duration) == pytest.approx(committed.paused_seconds, abs=1e-9)
        await c.begin("s", 2, 0)
        aborted = await c.abort("s", "no")
        assert proto_time.seconds(aborted.paused_duration) == pytest.approx(aborted.paused_seconds, abs=1e-9)

    run(scenario())


def test_max_pause_duration_wins_over_seconds_and_bad_durations_name_the_field():
    from google.protobuf.duration_pb2 import Duration

    assert max_pause_of(pb.BeginUpdate(max_pause_seconds=5)) == (5, "begin.max_pause_seconds")
    both = pb.BeginUpdate(max_pause_seconds=5, max_pause_duration=Duration(seconds=2, nanos=500_000_000))
    assert max_pause_of(both) == (2.5, "begin.max_pause_duration")
    zero = pb.BeginUpdate(max_pause_seconds=5, max_pause_duration=Duration())  # set to 0: the server's default
    assert max_pause_of(zero) == (0, "begin.max_pause_duration")
    for bad in (Duration(seconds=1, nanos=-1), Duration(nanos=10**9), Duration(seconds=2**62)):
        with pytest.raises(UpdateError, match="begin.max_pause_duration .* is not a valid Duration") as info:
            max_pause_of(pb.BeginUpdate(max_pause_duration=bad))
        assert info.value.code_name == "INVALID_ARGUMENT"
        assert info.value.metadata == {"field": "begin.max_pause_duration"}

    async def scenario():
        c = UpdateCoordinator(FakeEngine())
        seconds, field = max_pause_of(pb.BeginUpdate(max_pause_duration=Duration(seconds=-3)))
        with pytest.raises(UpdateError, match=r"begin.max_pause_duration -3 must be a finite number") as info:
            await c.begin("s", 1, seconds, field)
        assert info.value.code_name == "INVALID_ARGUMENT" and not c.paused
        assert info.value.metadata == {"field": "begin.max_pause_duration"}

    run(scenario())
