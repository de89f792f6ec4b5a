"""The check that makes the comparison meaningful: every side stores the same rows."""

from __future__ import annotations

from collections.abc import Sequence

from .sides import Side
from .state import make_states

__all__ = ["check_parity"]


async def check_parity(sides: Sequence[Side]) -> None:
    """Every side reads back what every other side wrote, identically.

    Guards the claim that the raw baselines store the same rows as the
    library (payload bytes, timestamp format, versions, delete counts): a
    mismatch here would make the comparison meaningless, so it aborts.
    """
    state = make_states(2)
    for writer in sides:
        user = f"parity-{writer.name}"
        assert await writer.write(user, state[0]) == 1
        assert await writer.write(user, state[1]) == 2
        seen = []
        for reader in sides:
            latest = await reader.get_latest(user)
            history = await reader.get_history(user, 10)
            assert latest is not None, f"{reader.name} does not see {writer.name}'s write"
            seen.append(
                [
                    (s.user_id, s.version, s.schema_version, s.state, s.created_at)
                    for s in [latest, *history]
                ]
            )
        if any(view != seen[0] for view in seen):
            raise RuntimeError(f"sides disagree on what {writer.name} wrote: {seen}")
        if seen[0][0][1:4] != (2, 1, state[1]) or [row[1] for row in seen[0][1:]] != [2, 1]:
            raise RuntimeError(f"unexpected rows after {writer.name}'s writes: {seen[0]}")
    for deleter, writer in zip(sides, [*sides[1:], sides[0]], strict=True):
        erased = await deleter.delete(f"parity-{writer.name}")
        if erased != 2:
            raise RuntimeError(f"{deleter.name} erased {erased} versions, expected 2")
        for reader in sides:
            if await reader.get_latest(f"parity-{writer.name}") is not None:
                raise RuntimeError(f"{deleter.name}'s delete left a row {reader.name} sees")
