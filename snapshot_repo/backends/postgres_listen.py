"""Postgres LISTEN: the connection that hears other processes' writes (NOTIFY).

A write with `notify` sends `pg_notify` on `NOTIFY_CHANNEL`, delivered at
commit. One pooled connection per engine LISTENs while anyone subscribes
(see `changes.ChangeHub`), through asyncpg's listener API on the driver
connection, and listens again after that connection is lost.

Not through a transaction pooler (`EngineSettings.transaction_pooler`): LISTEN
registers on the server connection the pooler lends for that one statement,
then gives to other clients, so nothing would ever be heard. `listen` refuses
at once there, instead of subscribing to silence.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import greenlet_spawn

from ..engine import behind_transaction_pooler
from ..errors import ConfigurationError
from .statements import NOTIFY_CHANNEL

__all__ = ["listen"]

logger = logging.getLogger("snapshot_repo")


async def listen(
    engine: AsyncEngine, deliver: Callable[[str], None], ready: asyncio.Future[None]
) -> None:
    """Hold a LISTEN connection, passing each payload to `deliver`, until cancelled.

    `ready` gets its result once LISTEN is active, or the first failure (then
    this returns): `ConfigurationError` at once for an engine behind a
    transaction pooler. A lost connection is replaced after a pause that
    doubles up to 5 s.
    """
    if behind_transaction_pooler(engine):
        ready.set_exception(
            ConfigurationError(
                "subscribe() and changes() need LISTEN, which cannot work through a "
                "transaction pooler (EngineSettings.transaction_pooler): the pooler gives "
                "the listening server connection to other clients after each statement. "
                "Poll changes_since() instead, or subscribe through an engine connected "
                "to Postgres directly (or to a pooler in session mode)"
            )
        )
        return
    delay = 0.1

    def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        deliver(payload)

    while True:
        try:
            fairy = await greenlet_spawn(engine.sync_engine.raw_connection)
        except Exception as exc:
            if not ready.done():
                ready.set_exception(exc)
                return
            logger.warning("snapshot_repo cannot re-listen for changes: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        connection: Any = fairy.driver_connection
        try:
            await connection.add_listener(NOTIFY_CHANNEL, on_notify)
            connection.add_termination_listener(partial(_mark_lost, lost))
            if not ready.done():
                ready.set_result(None)
            delay = 0.1
            await lost
            logger.warning("snapshot_repo lost its LISTEN connection; listening again")
        except asyncio.CancelledError:
            # Drop the LISTEN connection rather than UNLISTEN politely: the
            # server may be frozen, and a closed session listens no more.
            connection.terminate()
            _mark_lost(lost, connection)
            raise
        except Exception as exc:
            if not ready.done():
                ready.set_exception(exc)
                return
            logger.warning("snapshot_repo LISTEN failed: %s", exc)
        finally:
            await greenlet_spawn(fairy.invalidate if lost.done() else fairy.close)


def _mark_lost(lost: asyncio.Future[None], _connection: object) -> None:
    if not lost.done():
        lost.set_result(None)
