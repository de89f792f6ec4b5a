"""The workloads: what each one's calls are, identical for every side, and timing a side on one."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from .config import BenchConfig
from .seeding import Seeder
from .sides import Side
from .state import STATE_VARIANTS, BenchState, make_states, payload_of
from .timing import Sample, percentile, time_concurrent, time_sequential

__all__ = ["Workloads"]

_USERS_PER_WRITER = 8  # users each concurrent writer cycles over
_ArgT = TypeVar("_ArgT")


class Workloads:
    """Builds each workload's arguments (identical for every side) and times one side on it.

    User ids carry the side's name wherever a side writes, so sides never
    touch each other's rows; reads pick, per round, the same random users
    for every side.
    """

    def __init__(self, config: BenchConfig, seeder: Seeder) -> None:
        self._config = config
        self._seeder = seeder
        self._states = make_states(STATE_VARIANTS)
        self.seed_payload = payload_of(self._states[0])

    def describe(self, name: str) -> tuple[str, str]:
        """(description, what one latency sample covers) for the report."""
        c = self._config
        bulk = f"call of {c.bulk_size} snapshots"
        pooled = (("the core side", c.core), ("the sqlalchemy peer", c.peer))
        same_pool = " and ".join(name for name, run in pooled if run)
        descriptions = {
            "write": (f"sequential upsert_latest, cycling over {c.write_users} users", "call"),
            "write_concurrent": (
                f"{c.concurrency} concurrent writers, each on its own users "
                f"(library pool_size {c.settings.pool_size} + max_overflow "
                f"{c.settings.max_overflow}{f', as {same_pool}' if same_pool else ''}; "
                f"asyncpg and asyncmy: pools of {c.settings.pool_size}; SQLite raw: one "
                "connection)",
                "call, queueing included",
            ),
            "get_latest": (f"get_latest of random users among {c.read_users}", "call"),
            "get_history_shallow": (
                f"get_history(limit={c.history_limit}) of random users with "
                f"{c.history_versions} versions",
                "call",
            ),
            "get_history_deep": (
                f"get_history(limit={c.history_limit}) of one user with "
                f"{c.deep_versions:,} versions",
                "call",
            ),
            "delete": (f"delete of users with {c.delete_versions} versions each", "call"),
            "delete_traceless": (
                "the same delete, the raw sides then checkpointing and truncating the WAL "
                "as the library's erasure does, so no erased byte stays in the files "
                "(SQLite only)",
                "call",
            ),
            "delete_plain": (
                "the same delete, the library opened with "
                "EngineSettings(sqlite_secure_delete=False), so no side checkpoints "
                "(SQLite only)",
                "call",
            ),
            "bulk_write": (
                f"{c.bulk_size} snapshots of distinct users in one call "
                "(library: upsert_many; raw: one statement / one transaction"
                f"{'; sqlalchemy: two executemany calls in one transaction' if c.peer else ''})",
                bulk,
            ),
            "bulk_write_single": (
                f"the same {c.bulk_size} snapshots, one upsert_latest each",
                "call",
            ),
            "bulk_read": (
                f"latest of {c.bulk_size} users in one call (library: get_latest_many)",
                bulk,
            ),
            "bulk_read_single": (f"the same {c.bulk_size} users, one get_latest each", "call"),
        }
        return descriptions[name]

    async def seed_shared(self, sides: Sequence[Side]) -> None:
        """Seed what the reads read and the users the writes update, for every side.

        Seeding every written user up front makes every timed write an update
        (the common case) on every side, in every round.
        """
        c = self._config
        payload = self.seed_payload
        await self._seeder.seed("r-", c.read_users, 1, payload)
        await self._seeder.seed("h-", c.history_users, c.history_versions, payload)
        await self._seeder.seed("deep-", 1, c.deep_versions, payload)
        for side in sides:
            await self._seeder.seed(f"w-{side.name}-", c.write_users, 1, payload)
            await self._seeder.seed(
                f"c-{side.name}-", c.concurrency * _USERS_PER_WRITER, 1, payload
            )
            await self._seeder.seed(f"b-{side.name}-", c.bulk_size, 1, payload)
        await self._seeder.settle()

    def _state(self, index: int) -> BenchState:
        return self._states[index % len(self._states)]

    async def _sequential(
        self,
        op: Callable[[_ArgT], Awaitable[object]],
        args: Sequence[_ArgT],
        items_per_call: int = 1,
    ) -> Sample:
        """`time_sequential`, after leveling (see `Seeder.level`)."""
        await self._seeder.level()
        return await time_sequential(op, args, items_per_call)

    async def _concurrent(
        self, op: Callable[[_ArgT], Awaitable[object]], args: Sequence[_ArgT], workers: int
    ) -> Sample:
        """`time_concurrent`, after leveling (see `Seeder.level`)."""
        await self._seeder.level()
        return await time_concurrent(op, args, workers)

    async def depth(self, side: Side, tag: str) -> float:
        """p50 of `get_history` on the deep user / p50 on shallow users, calls alternating.

        One timed phase of `read_ops` calls, deep and shallow in turn, so both
        halves run under the same conditions. Timed as separate workloads,
        seconds apart, they did not: on this project's 2-vCPU machine the same
        read took either about 130 or about 250 µs depending on the moment,
        and the quotient of the two workloads' p50s swung from 0.49 to 1.65
        between runs of one build (SQLite, library side).
        """
        c = self._config
        rng = random.Random(f"{c.seed}-depth-{tag}")
        users: list[str] = []
        for _ in range(max(1, c.read_ops // 2)):
            users += ["deep-0", f"h-{rng.randrange(c.history_users)}"]
        sample = await self._sequential(lambda user: side.get_history(user, c.history_limit), users)
        deep, shallow = sorted(sample.latencies_ns[0::2]), sorted(sample.latencies_ns[1::2])
        return percentile(deep, 50) / percentile(shallow, 50)

    async def run(self, name: str, side: Side, tag: str, warmup: bool) -> Sample | str:
        """Time `side` on workload `name`; return the sample, or why the side cannot run it.

        `tag` names the round ("warmup", "r0", ...): it seeds the random
        choices (the same for every side) and keeps each round's deleted users
        apart. A warm-up runs at most `warmup_ops` calls (one bulk call).
        """
        c = self._config
        ops = min(c.ops, c.warmup_ops) if warmup else c.ops
        read_ops = min(c.read_ops, c.warmup_ops) if warmup else c.read_ops
        singles = min(c.bulk_size, c.warmup_ops) if warmup else c.bulk_size
        batches = 1 if warmup else c.bulk_batches
        s = side.name
        rng = random.Random(f"{c.seed}-{name}-{tag}")
        offset = rng.randrange(len(self._states))

        if name == "write":
            items = [(f"w-{s}-{i % c.write_users}", self._state(offset + i)) for i in range(ops)]
            return await self._sequential(lambda item: side.write(*item), items)
        if name == "write_concurrent":
            # Item i goes to worker i % concurrency, which cycles over users of its own.
            workers, own = c.concurrency, _USERS_PER_WRITER
            items = [
                (f"c-{s}-{(i % workers) * own + (i // workers) % own}", self._state(offset + i))
                for i in range(ops)
            ]
            return await self._concurrent(lambda item: side.write(*item), items, c.concurrency)
        if name == "get_latest":
            users = [f"r-{rng.randrange(c.read_users)}" for _ in range(read_ops)]
            return await self._sequential(side.get_latest, users)
        if name == "get_history_shallow":
            users = [f"h-{rng.randrange(c.history_users)}" for _ in range(read_ops)]
            return await self._sequential(
                lambda user: side.get_history(user, c.history_limit), users
            )
        if name == "get_history_deep":
            return await self._sequential(
                lambda user: side.get_history(user, c.history_limit), ["deep-0"] * read_ops
            )
        erasures: dict[str, tuple[str, str | None, Callable[[str], Awaitable[int]]]] = {
            # name: (user prefix, why the side cannot run it, the call)
            "delete": ("d", None, side.delete),
            "delete_traceless": ("t", side.traceless_delete_unavailable(), side.traceless_delete),
            "delete_plain": ("p", side.plain_delete_unavailable(), side.plain_delete),
        }
        if name in erasures:
            letter, unavailable, erase = erasures[name]
            if unavailable is not None:
                return unavailable
            prefix = f"{letter}-{tag}-{s}-"
            await self._seeder.seed(prefix, ops, c.delete_versions, self.seed_payload)
            return await self._sequential(erase, [f"{prefix}{i}" for i in range(ops)])

        batch = [(f"b-{s}-{k}", self._state(offset + k)) for k in range(c.bulk_size)]
        readers = [f"r-{i}" for i in rng.sample(range(c.read_users), c.bulk_size)]
        if name == "bulk_write":
            reason = side.bulk_write_unavailable()
            if reason is not None:
                return reason
            return await self._sequential(side.bulk_write, [batch] * batches, c.bulk_size)
        if name == "bulk_write_single":
            return await self._sequential(lambda item: side.write(*item), batch[:singles])
        if name == "bulk_read":
            reason = side.bulk_read_unavailable()
            if reason is not None:
                return reason
            return await self._sequential(side.bulk_read, [readers] * batches, c.bulk_size)
        if name == "bulk_read_single":
            return await self._sequential(side.get_latest, readers[:singles])
        raise AssertionError(f"unknown workload {name}")
