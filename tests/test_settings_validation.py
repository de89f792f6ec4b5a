"""`EngineSettings` refuses every bad value when it is built, before any connection opens.

SQLite and the drivers would otherwise change a bad value into another one
without a word: a negative busy timeout into no wait at all, an unknown
`synchronous` level into NORMAL (a durability downgrade).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest

import snapshot_repo as sr
from snapshot_repo.engine import MAX_WAIT_SECONDS

BAD_SETTINGS = [
    # The cases of issue #20.
    pytest.param("busy_timeout", -5, id="busy-negative"),
    pytest.param("pool_timeout", -1, id="pool-timeout-negative"),
    pytest.param("connect_timeout", 0, id="connect-timeout-zero"),
    pytest.param("busy_timeout", math.nan, id="busy-nan"),
    pytest.param("sqlite_synchronous", "FUL", id="synchronous-misspelt"),
    # Timeouts: positive, finite, numbers, within what the drivers can count.
    pytest.param("connect_timeout", math.inf, id="connect-timeout-inf"),
    pytest.param("connect_timeout", "5", id="connect-timeout-str"),
    pytest.param("connect_timeout", True, id="connect-timeout-bool"),
    pytest.param("command_timeout", 0, id="command-timeout-zero"),
    pytest.param("command_timeout", -1.5, id="command-timeout-negative"),
    pytest.param("command_timeout", math.nan, id="command-timeout-nan"),
    pytest.param("command_timeout", math.inf, id="command-timeout-inf"),
    pytest.param("pool_timeout", math.nan, id="pool-timeout-nan"),
    pytest.param("pool_timeout", None, id="pool-timeout-none"),
    pytest.param("busy_timeout", 0.0001, id="busy-under-a-millisecond"),
    pytest.param("busy_timeout", MAX_WAIT_SECONDS * 2, id="busy-over-int32-ms"),
    pytest.param("busy_timeout", -math.inf, id="busy-minus-inf"),
    # Pool sizes: integers, not booleans.
    pytest.param("pool_size", 0, id="pool-size-zero"),
    pytest.param("pool_size", -3, id="pool-size-negative"),
    pytest.param("pool_size", True, id="pool-size-bool"),
    pytest.param("pool_size", 2.0, id="pool-size-float"),
    pytest.param("max_overflow", -1, id="max-overflow-negative"),
    pytest.param("max_overflow", False, id="max-overflow-bool"),
    pytest.param("max_overflow", "0", id="max-overflow-str"),
    # The mapping's size: a whole number of bytes, 0 (off) up to a 64-bit integer.
    pytest.param("sqlite_mmap_size", -1, id="mmap-negative"),
    pytest.param("sqlite_mmap_size", True, id="mmap-bool"),
    pytest.param("sqlite_mmap_size", 1.5e9, id="mmap-float"),
    pytest.param("sqlite_mmap_size", "268435456", id="mmap-str"),
    pytest.param("sqlite_mmap_size", 2**63, id="mmap-over-int64"),
    # Flags: booleans only ("no" would be truthy).
    pytest.param("sqlite_secure_delete", "no", id="secure-delete-str"),
    pytest.param("sqlite_secure_delete", 0, id="secure-delete-int"),
    pytest.param("sqlite_inline_reads", None, id="inline-reads-none"),
    # The synchronous level: one of SQLite's four names.
    pytest.param("sqlite_synchronous", "", id="synchronous-empty"),
    pytest.param("sqlite_synchronous", "2", id="synchronous-number-text"),
    pytest.param("sqlite_synchronous", 2, id="synchronous-int"),
    pytest.param("sqlite_synchronous", "FULL; DROP TABLE x", id="synchronous-injection"),
]


@pytest.mark.parametrize(("name", "value"), BAD_SETTINGS)
def test_a_bad_setting_is_refused_naming_it(name: str, value: Any):
    with pytest.raises(sr.ConfigurationError, match=name) as caught:
        sr.EngineSettings(**{name: value})
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(("name", "value"), BAD_SETTINGS)
def test_replace_is_checked_too(name: str, value: Any):
    with pytest.raises(sr.ConfigurationError, match=name):
        dataclasses.replace(sr.EngineSettings(), **{name: value})


@pytest.mark.parametrize(
    "settings",
    [
        {"connect_timeout": 1, "command_timeout": None, "busy_timeout": 0.001},
        {"busy_timeout": MAX_WAIT_SECONDS, "pool_timeout": 0.25, "pool_size": 1},
        {"max_overflow": 0, "sqlite_secure_delete": False, "sqlite_inline_reads": False},
        {"sqlite_synchronous": "OFF"},
        {"sqlite_mmap_size": 0},
        {"sqlite_mmap_size": 2**63 - 1},
        {"sqlite_synchronous": "EXTRA"},
    ],
)
def test_good_settings_are_kept_as_given(settings: dict[str, Any]):
    built = sr.EngineSettings(**settings)
    assert {name: getattr(built, name) for name in settings} == settings


@pytest.mark.parametrize(
    ("given", "stored"), [("full", "FULL"), ("Normal", "NORMAL"), ("off", "OFF")]
)
def test_the_synchronous_level_is_accepted_in_any_case_and_kept_in_upper_case(
    given: str, stored: str
):
    assert sr.EngineSettings(sqlite_synchronous=given).sqlite_synchronous == stored  # type: ignore[arg-type]
    assert sr.EngineSettings(sqlite_synchronous=given) == sr.EngineSettings(
        sqlite_synchronous=stored  # type: ignore[arg-type]
    )


def test_create_engine_refuses_something_else_than_settings(tmp_path: Path):
    with pytest.raises(sr.ConfigurationError, match="EngineSettings"):
        sr.create_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", {"busy_timeout": -5})  # type: ignore[arg-type]
    assert not (tmp_path / "x.db").exists()


async def test_sqlite_runs_at_the_level_asked_for(tmp_path: Path):
    """The level reaches the file: a lowercase FULL is FULL (2), not SQLite's fallback."""
    path = tmp_path / "levels.db"
    settings = sr.EngineSettings(sqlite_synchronous="full", busy_timeout=0.25)  # type: ignore[arg-type]
    engine = sr.create_engine(f"sqlite+aiosqlite:///{path}", settings)
    try:
        async with engine.connect() as conn:
            synchronous = (await conn.exec_driver_sql("PRAGMA synchronous")).scalar()
            busy_ms = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar()
    finally:
        await engine.dispose()
    assert (synchronous, busy_ms) == (2, 250)


def test_settings_added_later_come_last_so_positional_arguments_keep_their_meaning():
    names = [field.name for field in dataclasses.fields(sr.EngineSettings)]
    assert names == [
        "connect_timeout",
        "command_timeout",
        "busy_timeout",
        "sqlite_synchronous",
        "sqlite_secure_delete",
        "sqlite_inline_reads",
        "pool_size",
        "max_overflow",
        "pool_timeout",
        "transaction_pooler",
        "sqlite_mmap_size",
    ]
