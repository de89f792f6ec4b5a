"""Turns at the connections: FIFO once a waiter has waited its patience, barging before."""

from __future__ import annotations

import asyncio
import math

import pytest

from snapshot_repo._turns import Turns


async def test_a_caller_goes_ahead_of_a_waiter_that_has_not_waited_its_patience():
    turns = Turns(1, patience=math.inf)
    assert turns.try_take()
    waiter = asyncio.create_task(turns.take())
    await asyncio.sleep(0)  # the waiter queues
    turns.give_back()
    assert turns.try_take()  # the caller that just finished takes the turn again
    await asyncio.sleep(0)
    assert not waiter.done()
    turns.give_back()  # nobody takes it at once: the waiter gets it a loop step later
    await asyncio.wait_for(waiter, 1)
    assert not turns.try_take()


async def test_once_a_waiter_has_waited_its_patience_turns_are_first_come_first_served():
    turns = Turns(1, patience=0.0)
    assert turns.try_take()
    first = asyncio.create_task(turns.take())
    second = asyncio.create_task(turns.take())
    await asyncio.sleep(0)
    turns.give_back()
    assert not turns.try_take()  # a newcomer queues behind the waiters
    await asyncio.wait_for(first, 1)
    assert not second.done()
    turns.give_back()
    await asyncio.wait_for(second, 1)


async def test_a_waiter_cancelled_as_it_is_handed_a_turn_passes_it_on():
    turns = Turns(1, patience=0.0)
    assert turns.try_take()
    cancelled = asyncio.create_task(turns.take())
    behind = asyncio.create_task(turns.take())
    await asyncio.sleep(0)
    turns.give_back()  # hands the turn to `cancelled` ...
    cancelled.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await asyncio.wait_for(behind, 1)  # the turn went on, not lost
    turns.give_back()
    assert turns.try_take()


async def test_others_active_counts_other_holders_and_waiters_but_not_the_asker():
    turns = Turns(2, patience=math.inf)
    assert turns.try_take()
    assert not turns.others_active  # only the caller asking holds a turn
    assert turns.try_take()
    assert turns.others_active  # a second holder
    waiter = asyncio.create_task(turns.take())
    await asyncio.sleep(0)
    turns.give_back()
    assert turns.others_active  # one holder left, and a waiter about to be handed a turn
    await asyncio.wait_for(waiter, 1)
    turns.give_back()
    assert not turns.others_active  # the waiter now holds the only turn taken
