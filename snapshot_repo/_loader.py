"""The load's writes: validated rows in, batched inserts out, inside one transaction.

`backup.load` owns the transaction and reads the lines; `Loader` checks the
order of each user's versions, builds `snapshot_latest` as each user's last
line goes by, and inserts history, latest rows and erasure receipts a batch
at a time, so memory stays bounded whatever the size of the dump.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from ._dump_format import KEY, Progress
from ._load_lines import receipt_from_line, row_from_line
from ._translate import storage_errors
from .backends.count_sql import recount_statements
from .errors import SnapshotValidationError
from .tables import erasure_receipts_table, history_table, latest_table

__all__ = ["Loader"]


@dataclass
class _Pending:
    """The newest line read so far of the user being read: their latest row, if none follows."""

    number: int
    row: dict[str, Any]
    expires_at: datetime | None


@dataclass
class Loader:
    """Validated rows in, batched inserts out, inside the load's one transaction."""

    conn: AsyncConnection
    batch_size: int
    progress: Progress | None
    rows: int = 0
    receipts: int = 0
    _history: list[dict[str, Any]] = field(default_factory=list)
    _latest: list[dict[str, Any]] = field(default_factory=list)
    _lines: list[int] = field(default_factory=list)
    _receipts: list[dict[str, Any]] = field(default_factory=list)
    _pending: _Pending | None = None

    async def add_row(self, number: int, value: Any) -> None:
        """Take line `number`'s history row; insert the batch once it holds `batch_size`.

        Raises:
            SnapshotValidationError: the line is not a valid row, or breaks the
                order of its user's versions (consecutive and ascending, with
                `expires_at` only on the last).
            StorageError: the batch's insert failed.
        """
        row, expires_at = row_from_line(number, value)
        pending = self._pending
        if pending is not None and all(pending.row[k] == row[k] for k in KEY[:3]):
            if row["version"] <= pending.row["version"]:
                raise SnapshotValidationError(
                    f"line {number} of the dump: version {row['version']} follows version "
                    f"{pending.row['version']} of the same user (line {pending.number}); "
                    "a user's versions must be consecutive lines in ascending order"
                )
            if pending.expires_at is not None:
                raise SnapshotValidationError(
                    f"line {pending.number} of the dump: expires_at is set on a version "
                    f"that is not the user's latest (line {number} has a newer one)"
                )
        elif pending is not None:
            self._add_latest(pending)
        self._pending = _Pending(number, row, expires_at)
        self._history.append(row)
        self._lines.append(number)
        if len(self._history) >= self.batch_size:
            await self._flush_rows()

    async def add_receipt(self, number: int, value: dict[str, Any]) -> None:
        """Take line `number`'s erasure receipt; insert the batch once it holds `batch_size`."""
        self._receipts.append(receipt_from_line(number, value))
        if len(self._receipts) >= self.batch_size:
            await self._flush_receipts()

    async def finish(self) -> None:
        """Insert what is still batched, the last user's latest row included."""
        if self._pending is not None:
            self._add_latest(self._pending)
            self._pending = None
        await self._flush_rows()
        await self._flush_receipts()
        async with storage_errors("load (counting the users)"):
            for statement in recount_statements():
                await self.conn.execute(statement)

    def _add_latest(self, pending: _Pending) -> None:
        self._latest.append({**pending.row, "expires_at": pending.expires_at})
        self._lines.append(pending.number)

    async def _flush_rows(self) -> None:
        """Insert the batch's history rows and the latest rows of the users it completed.

        At the end the batch may hold only a latest row: the last user's, whose
        last version went out with the previous (full) batch.
        """
        if not self._history and not self._latest:
            return
        first, last = min(self._lines), max(self._lines)
        async with storage_errors(f"load (the rows of lines {first} to {last})"):
            if self._history:
                await self.conn.execute(insert(history_table), self._history)
            if self._latest:
                await self.conn.execute(insert(latest_table), self._latest)
        if self._history:
            self.rows += len(self._history)
            if self.progress is not None:
                self.progress(self.rows)
        self._history, self._latest, self._lines = [], [], []

    async def _flush_receipts(self) -> None:
        if not self._receipts:
            return
        async with storage_errors("load (erasure receipts)"):
            await self.conn.execute(insert(erasure_receipts_table), self._receipts)
        self.receipts += len(self._receipts)
        self._receipts = []
