"""One watchdog timer per loop enforces every call's deadline: never early, at most 1/8 late."""

from __future__ import annotations

import asyncio

import pytest

from snapshot_repo import _deadlines


async def test_a_deadline_cancels_its_task_never_early_and_at_most_an_eighth_late():
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = _deadlines.start(0.4)
    with pytest.raises(asyncio.CancelledError) as caught:
        await asyncio.sleep(5)
    elapsed = loop.time() - started
    _deadlines.stop(deadline)
    assert deadline.expired_for(caught.type)
    assert 0.4 <= elapsed < 0.4 * (1 + 1 / 8) + 0.05
    assert asyncio.current_task().cancelling() == 0  # its cancel request was withdrawn


async def test_a_stopped_deadline_never_fires_and_others_still_do():
    stopped = _deadlines.start(0.1)
    _deadlines.stop(stopped)

    async def waits_for(seconds: float) -> bool:
        deadline = _deadlines.start(seconds)
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError as cancelled:
            _deadlines.stop(deadline)
            return deadline.expired_for(type(cancelled))
        _deadlines.stop(deadline)
        return False

    assert await asyncio.gather(waits_for(0.15), waits_for(0.3)) == [True, True]
    await asyncio.sleep(0.2)  # past the stopped deadline: this task is not cancelled
    assert not stopped.expired


async def test_a_cancellation_requested_by_someone_else_is_not_the_deadlines():
    async def guarded() -> str:
        deadline = _deadlines.start(0.2)
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError as cancelled:
            _deadlines.stop(deadline)
            if deadline.expired_for(type(cancelled)):
                return "deadline"
            raise
        return "finished"

    task = asyncio.create_task(guarded())
    await asyncio.sleep(0.05)
    task.cancel()  # before the deadline: the caller's own cancellation
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.create_task(guarded()) == "deadline"
