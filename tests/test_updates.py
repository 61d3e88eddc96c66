"""The update protocol's state machine with a fake engine: milliseconds, no vLLM.

The fake records pause / resume / prefix-cache resets, so every transition can be checked: begin,
commit, abort (trainer, silence, stream broken, shutdown), heartbeats, torn weights, per-update ids.
Run as: .venv/bin/python -m pytest tests/test_updates.py -v
"""

from __future__ import annotations

import asyncio

import pytest

from inference_side.updates import UpdateCoordinator, UpdateError
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
        c = UpdateCoordinator(engine, pb.UPDATE_MODE_STRICT)
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
        c = UpdateCoordinator(engine, pb.UPDATE_MODE_CONCURRENT)
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
