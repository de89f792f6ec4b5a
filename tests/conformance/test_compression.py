"""Optional zstd compression of stored states, on every backend.

Measured here (README, Performance): a realistic 680 KB state of repeated
records stores in a few percent of its size.
"""

from __future__ import annotations

import io
import json

import pytest

import snapshot_repo as sr
from snapshot_repo.backup import dump
from snapshot_repo.compression import ZSTD_MAGIC
from snapshot_repo.crypto import SEALED_PREFIX
from tests.support.conformance import Doc, MakeRepo, snap, stored_payloads


def big_state(kilobytes: int) -> list[str]:
    """Items that look like a real cart or agent memory (repetitive, not random), of
    about `kilobytes` KB as JSON (each item is about 35 bytes with its quotes and comma)."""
    return [
        f"sku-{n % 97:03d}: qty {n % 7}, note 'gift wrap'" for n in range(kilobytes * 1000 // 35)
    ]


class TestCompression:
    async def test_a_large_state_is_stored_compressed_and_reads_back_on_every_path(
        self, make_repo: MakeRepo
    ):
        repo = await make_repo(compression="zstd")
        items = big_state(680)
        first = await repo.upsert_latest(snap("u", "big", *items))
        await repo.upsert_latest(snap("u", "small"))
        size = len(Doc(note="big", items=items).model_dump_json())
        assert size > 680_000
        stored = await stored_payloads(repo.engine, "u")
        assert len(stored) == 3  # the latest row and two history rows
        big = [p for p in stored if len(p) > 100 or p.startswith(ZSTD_MAGIC)]
        assert all(p.startswith(ZSTD_MAGIC) for p in big)
        assert max(len(p) for p in big) < size // 20  # measured: about 1 %
        assert await repo.get_version("u", 1) == first
        assert (await repo.get_history("u"))[1] == first
        assert [s.version async for s in repo.iter_history("u", page_size=1)] == [2, 1]
        patch = await repo.diff("u", 1, 2)
        assert {"op": "replace", "path": "/note", "value": "small"} in patch
        exported = await repo.export_user("u")
        versions = exported["versions"]
        assert isinstance(versions, list)
        assert versions[1]["state"]["items"] == items  # type: ignore[index]

    async def test_rows_of_either_kind_read_with_or_without_the_option(self, make_repo: MakeRepo):
        plain = await make_repo()
        packed = await make_repo(compression="zstd")
        before = await plain.upsert_latest(snap("u", "written plain", *big_state(20)))
        after = await packed.upsert_latest(snap("u", "written compressed", *big_state(20)))
        for reader in (plain, packed):
            history = await reader.get_history("u")
            assert [s.state for s in history] == [after.state, before.state]
            # Every read path opens the compressed latest row, not only history.
            latest = await reader.get_latest("u")
            assert latest is not None
            assert latest.state == after.state
            assert (await reader.get_latest_many(["u"]))["u"].state == after.state
            assert (await reader.get_version("u", 2)) == latest
            assert (await reader.get_version("u", 1)) == before
        stored = await stored_payloads(plain.engine, "u")
        assert sorted(p.startswith(ZSTD_MAGIC) for p in stored) == [False, True, True]

    async def test_the_size_limit_applies_to_the_uncompressed_state(self, make_repo: MakeRepo):
        repo = await make_repo(compression="zstd")
        with pytest.raises(sr.SnapshotValidationError, match="max_payload_bytes"):
            await repo.upsert_latest(snap("u", "too big", *big_state(1200)))
        assert await repo.get_latest("u") is None

    async def test_a_small_state_is_stored_as_json_when_compression_saves_nothing(
        self, make_repo: MakeRepo
    ):
        repo = await make_repo(compression="zstd")
        await repo.upsert_latest(snap("u", "x"))
        assert all(p.startswith(b"{") for p in await stored_payloads(repo.engine, "u"))

    async def test_compression_comes_before_encryption(self, make_repo: MakeRepo):
        provider = sr.LocalKeyProvider({"k1": b"1" * 32}, active="k1")
        repo = await make_repo(compression="zstd", encryption=provider)
        items = big_state(100)
        stored_state = await repo.upsert_latest(snap("u", "sealed", *items))
        payloads = await stored_payloads(repo.engine, "u")
        assert all(p.startswith(SEALED_PREFIX) for p in payloads)
        assert max(len(p) for p in payloads) < len(json.dumps(items)) // 10  # sealed small
        assert await repo.get_latest("u") == stored_state

    async def test_a_dump_of_a_compressed_store_holds_readable_json(self, make_repo: MakeRepo):
        repo = await make_repo(compression="zstd")
        await repo.migrate()
        await repo.upsert_latest(snap("u", "dumped", *big_state(20)))
        out = io.BytesIO()
        assert await dump(repo.engine, out) == 1
        rows = [json.loads(line) for line in out.getvalue().splitlines()[1:-1]]
        assert rows[0]["state"]["note"] == "dumped"

    @pytest.mark.parametrize("compression", ["gzip", "ZSTD", True, 1])
    async def test_an_unknown_compression_is_a_configuration_error(
        self, make_repo: MakeRepo, compression: object
    ):
        with pytest.raises(sr.ConfigurationError, match="compression must be"):
            await make_repo(compression=compression)
