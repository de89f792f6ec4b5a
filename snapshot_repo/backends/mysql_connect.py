"""Connecting to MySQL/MariaDB with asyncmy, bounded as a whole by `connect_timeout`.

`engine.create_engine` hands this to SQLAlchemy as the engine's
`async_creator`, so the MySQL driver is imported here, in the backends, and
only when a MySQL URL is used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.engine import URL

from ..errors import ConfigurationError

__all__ = ["bounded_connect"]


def bounded_connect(
    url: URL, connect_args: dict[str, Any], timeout: float
) -> Callable[[], Awaitable[Any]]:
    """asyncmy's connect, bounded by `timeout` as a whole.

    asyncmy's own `connect_timeout` bounds the TCP connect only: a server that
    accepts the connection and never greets (frozen, overloaded) would hold the
    caller until its operation timeout, or forever where there is none
    (`migrate`). The arguments are the ones SQLAlchemy's dialect would pass.
    """
    try:
        import asyncmy
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"{url.drivername} needs the {exc.name!r} package: pip install 'snapshot-repo[mysql]'"
        ) from None
    cargs, cparams = url.get_dialect()().create_connect_args(url)
    cparams.update(connect_args)

    async def connect() -> Any:
        try:
            async with asyncio.timeout(timeout):
                return await asyncmy.connect(*cargs, **cparams)
        except TimeoutError:
            message = f"connecting to the server timed out after {timeout:g} s (connect_timeout)"
            raise TimeoutError(message) from None

    return connect
