"""The five-minute tour: store a cart, change it, read its history, erase it.

Runs on the embedded SQLite default (`snapshots.db` in the working
directory); set SNAPSHOT_REPO_URL to a Postgres URL to run it there instead.
"""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel

import snapshot_repo as sr


class Cart(BaseModel):
    items: list[str] = []


async def main() -> None:
    url = os.environ.get("SNAPSHOT_REPO_URL", "sqlite+aiosqlite:///snapshots.db")
    async with sr.SnapshotRepository.from_url(url, Cart) as repo:
        await repo.migrate()
        await repo.delete("demo-user")  # start the demo from scratch every run

        first = await repo.upsert_latest(
            sr.Snapshot(user_id="demo-user", state=Cart(items=["tea"]))
        )
        print(f"stored version {first.version} at {first.created_at:%Y-%m-%d %H:%M:%S %Z}")

        second = await repo.upsert_latest(
            sr.Snapshot(user_id="demo-user", state=Cart(items=["tea", "milk"])),
            expected_version=first.version,  # compare-and-set: refuse if someone wrote in between
        )
        try:
            await repo.upsert_latest(
                sr.Snapshot(user_id="demo-user", state=Cart(items=["stale"])),
                expected_version=first.version,
            )
        except sr.VersionConflictError as conflict:
            print(f"stale write refused: {conflict}")

        latest = await repo.get_latest("demo-user")
        assert latest == second
        print(f"latest: version {latest.version}, items {latest.state.items}")
        for snapshot in await repo.get_history("demo-user", limit=10):
            print(f"  history: version {snapshot.version}, items {snapshot.state.items}")

        print(f"healthy: {await repo.health_check()}")
        print(f"erased {await repo.delete('demo-user')} versions (GDPR delete)")
        print(f"after erase: {await repo.get_latest('demo-user')}")


if __name__ == "__main__":
    asyncio.run(main())
