"""Alembic environment for snapshot_repo.

Two ways in:
- from the library (`snapshot_repo.migrate`), which hands over an open
  connection in `config.attributes["connection"]` (Alembic's connection
  sharing recipe) inside a transaction it owns;
- from the `alembic` command in a checkout, which connects to
  `SNAPSHOT_REPO_URL` (default: the SQLite file the CLI uses) with the
  library's own engine settings.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import Connection

from snapshot_repo.engine import DEFAULT_URL, create_engine
from snapshot_repo.migrate import VERSION_TABLE, is_own_schema_object
from snapshot_repo.tables import metadata

config = context.config


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        # SQLite cannot ALTER most things in place: batch mode copies the table.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        # `check` compares only this library's tables: the database may be shared.
        include_name=is_own_schema_object,
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    url = os.environ.get("SNAPSHOT_REPO_URL") or config.get_main_option("sqlalchemy.url")
    engine = create_engine(url or DEFAULT_URL)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("snapshot_repo migrations run online only: connect to the database")

shared_connection = config.attributes.get("connection")
if shared_connection is not None:
    run_migrations(shared_connection)
else:
    asyncio.run(run_async_migrations())
