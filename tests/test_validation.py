"""Bad input is refused with a typed error and changes nothing; good input round-trips exactly."""

from __future__ import annotations

import copy as copy_module
import math
import pickle
from datetime import datetime
from typing import Any

import pytest
from pydantic import BaseModel

import snapshot_repo as sr
from tests.support.databases import Backend, Cart


class Reading(BaseModel):
    value: float
    taken_at: datetime | None = None
    label: str = ""


def raw_snapshot(user_id: Any, state: Any) -> sr.Snapshot[Any]:
    """A snapshot built without validation, as a caller bypassing pydantic could."""
    return sr.Snapshot.model_construct(user_id=user_id, state=state, schema_version=1)


BAD_USER_IDS = [
    pytest.param("", id="empty"),
    pytest.param("x" * 256, id="too-long"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("line\nbreak", id="newline"),
    pytest.param("tab\there", id="tab"),
    pytest.param("bell\x07", id="bell"),
    pytest.param("del\x7f", id="delete-char"),
    pytest.param("caf\u00e9\x85", id="c1-control-after-non-ascii"),
    pytest.param("\ud800", id="lone-surrogate"),
    pytest.param(123, id="int"),
    pytest.param(None, id="none"),
    pytest.param(b"bytes", id="bytes"),
]


@pytest.mark.parametrize("user_id", BAD_USER_IDS)
async def test_bad_user_ids_are_refused_everywhere(repo: sr.SnapshotRepository[Cart], user_id):
    with pytest.raises(sr.SnapshotValidationError, match="user_id"):
        await repo.upsert_latest(raw_snapshot(user_id, Cart()))
    with pytest.raises(sr.SnapshotValidationError, match="user_id"):
        await repo.get_latest(user_id)
    with pytest.raises(sr.SnapshotValidationError, match="user_id"):
        await repo.get_history(user_id, limit=1)
    with pytest.raises(sr.SnapshotValidationError, match="user_id"):
        await repo.delete(user_id)


@pytest.mark.parametrize("user_id", BAD_USER_IDS)
def test_bad_user_ids_are_refused_when_building_a_snapshot(user_id):
    with pytest.raises(ValueError, match="user_id"):
        sr.Snapshot(user_id=user_id, state={})


@pytest.mark.parametrize(
    "user_id", ["a", "x" * 255, "ünïcödé-ユーザー", "emoji-🦄", "with space", "quote'\"\\"]
)
async def test_good_user_ids_round_trip(repo: sr.SnapshotRepository[Cart], user_id: str):
    stored = await repo.upsert_latest(sr.Snapshot(user_id=user_id, state=Cart(items=["a"])))
    latest = await repo.get_latest(user_id)
    assert latest == stored
    assert latest is not None
    assert latest.user_id == user_id
    assert await repo.delete(user_id) == 1


@pytest.mark.parametrize(
    "state",
    [
        pytest.param({"items": "not a list"}, id="wrong-field-type"),
        pytest.param({"items": [1, 2]}, id="wrong-item-type"),
        pytest.param([1, 2, 3], id="list"),
        pytest.param("text", id="string"),
        pytest.param(None, id="none"),
    ],
)
async def test_states_that_do_not_fit_the_model_are_refused(
    repo: sr.SnapshotRepository[Cart], state
):
    await repo.upsert_latest(sr.Snapshot(user_id="u1", state=Cart(items=["kept"])))
    with pytest.raises(sr.SnapshotValidationError, match="does not validate against Cart"):
        await repo.upsert_latest(raw_snapshot("u1", state))
    latest = await repo.get_latest("u1")
    assert latest is not None
    assert (latest.version, latest.state.items) == (1, ["kept"])


@pytest.mark.parametrize(
    "state",
    [
        pytest.param({"a": {1, 2}}, id="set"),
        pytest.param({"a": object()}, id="object"),
        pytest.param([1], id="not-an-object"),
        pytest.param("x", id="string"),
    ],
)
async def test_json_repository_refuses_what_json_cannot_hold(
    json_repo: sr.SnapshotRepository[sr.JsonObject], state
):
    with pytest.raises(sr.SnapshotValidationError):
        await json_repo.upsert_latest(raw_snapshot("u1", state))
    assert await json_repo.get_latest("u1") is None


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
async def test_nan_and_infinity_are_refused_not_stored_as_null(backend: Backend, value: float):
    async with sr.SnapshotRepository.from_url(backend.url, Reading) as repo:
        with pytest.raises(sr.SnapshotValidationError, match="NaN or an infinite"):
            await repo.upsert_latest(sr.Snapshot(user_id="u1", state=Reading(value=value)))
        assert await repo.get_latest("u1") is None
    async with sr.SnapshotRepository.from_url(backend.url) as json_repo:
        with pytest.raises(sr.SnapshotValidationError, match="NaN or an infinite"):
            await json_repo.upsert_latest(
                sr.Snapshot(user_id="u1", state={"deep": [{"v": value}], "other": None})
            )
        assert await json_repo.get_latest("u1") is None


async def test_explicit_nulls_are_not_mistaken_for_nan(
    json_repo: sr.SnapshotRepository[sr.JsonObject],
):
    stored = await json_repo.upsert_latest(sr.Snapshot(user_id="u1", state={"a": None, "b": 1.5}))
    assert stored.version == 1
    latest = await json_repo.get_latest("u1")
    assert latest is not None
    assert latest.state == {"a": None, "b": 1.5}


async def test_lone_surrogate_in_state_is_refused(repo: sr.SnapshotRepository[Cart]):
    with pytest.raises(sr.SnapshotValidationError, match="cannot be serialized"):
        await repo.upsert_latest(sr.Snapshot(user_id="u1", state=Cart(items=["\ud800"])))
    assert await repo.get_latest("u1") is None


TRICKY_STRINGS = [
    "double \"quotes\" and 'single'",
    "back\\slash \\u0000 literally",
    "nul\x00inside",
    "\x00",
    "emoji 🦄👩‍👩‍👧 and CJK 漢字",
    "control \x01\x1f\x7f and newline\n\r\t",
    "right-to-left \u202e and zero-width \u200b",
    "",
    "x" * 100_000,
]


@pytest.mark.parametrize("text", TRICKY_STRINGS, ids=range(len(TRICKY_STRINGS)))
async def test_any_string_pydantic_accepts_round_trips_exactly(
    repo: sr.SnapshotRepository[Cart], text: str
):
    stored = await repo.upsert_latest(
        sr.Snapshot(user_id="u1", state=Cart(items=[text], note=text))
    )
    latest = await repo.get_latest("u1")
    assert latest is not None
    assert latest.state.items == [text]
    assert latest.state.note == text
    assert latest == stored
    [from_history] = await repo.get_history("u1", limit=1)
    assert from_history.state.note == text


async def test_naive_datetime_inside_a_state_round_trips_naive(backend: Backend):
    naive = datetime(2024, 2, 29, 23, 59, 59, 999999)
    async with sr.SnapshotRepository.from_url(backend.url, Reading) as repo:
        await repo.upsert_latest(sr.Snapshot(user_id="u1", state=Reading(value=1, taken_at=naive)))
        latest = await repo.get_latest("u1")
    assert latest is not None
    assert latest.state.taken_at == naive
    assert latest.state.taken_at.tzinfo is None


async def test_oversized_payload_is_refused_and_limit_is_configurable(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url, Cart, max_payload_bytes=100) as repo:
        await repo.upsert_latest(sr.Snapshot(user_id="u1", state=Cart(items=["small"])))
        with pytest.raises(sr.SnapshotValidationError, match="the limit is 100"):
            await repo.upsert_latest(sr.Snapshot(user_id="u1", state=Cart(items=["x" * 100])))
        latest = await repo.get_latest("u1")
        assert latest is not None
        assert latest.version == 1


async def test_default_payload_limit_is_one_mebibyte(repo: sr.SnapshotRepository[Cart]):
    assert sr.DEFAULT_MAX_PAYLOAD_BYTES == 1024 * 1024
    with pytest.raises(sr.SnapshotValidationError, match="the limit is 1048576"):
        await repo.upsert_latest(sr.Snapshot(user_id="u1", state=Cart(note="x" * (1024 * 1024))))
    ok = await repo.upsert_latest(sr.Snapshot(user_id="u1", state=Cart(note="x" * 1_000_000)))
    assert ok.version == 1


@pytest.mark.parametrize("limit", [0, 1 << 32, 16 * 1024 * 1024 + 1, -5])
def test_payload_limit_outside_1_byte_to_16_mib_is_a_configuration_error(limit: int):
    with pytest.raises(sr.ConfigurationError, match="max_payload_bytes"):
        sr.SnapshotRepository.from_url("sqlite+aiosqlite:///unused.db", max_payload_bytes=limit)


@pytest.mark.parametrize("limit", [0, -1, 10_001, 2**70, 1.5, "10", True, None])
async def test_bad_history_limits_are_refused(repo: sr.SnapshotRepository[Cart], limit):
    with pytest.raises(sr.SnapshotValidationError, match="limit"):
        await repo.get_history("u1", limit=limit)


@pytest.mark.parametrize("expected", [-1, 2**63, 1.0, "1", True])
async def test_bad_expected_versions_are_refused(repo: sr.SnapshotRepository[Cart], expected):
    with pytest.raises(sr.SnapshotValidationError, match="expected_version"):
        await repo.upsert_latest(sr.Snapshot(user_id="u1", state=Cart()), expected_version=expected)
    assert await repo.get_latest("u1") is None


async def test_non_snapshot_argument_is_refused(repo: sr.SnapshotRepository[Cart]):
    with pytest.raises(sr.SnapshotValidationError, match="takes a Snapshot"):
        await repo.upsert_latest({"user_id": "u1", "state": {}})  # type: ignore[arg-type]


async def test_stored_state_that_no_longer_validates_names_user_and_version(backend: Backend):
    async with sr.SnapshotRepository.from_url(backend.url) as old_code:
        await old_code.upsert_latest(sr.Snapshot(user_id="legacy-user", state={"items": "old"}))
    async with sr.SnapshotRepository.from_url(backend.url, Cart) as new_code:
        with pytest.raises(sr.SnapshotValidationError, match=r"user leg\.\.\. version 1") as err:
            await new_code.get_latest("legacy-user")
        assert "old" not in str(err.value)
        with pytest.raises(sr.SnapshotValidationError, match="version 1"):
            await new_code.get_history("legacy-user")


def test_error_hierarchy():
    assert issubclass(sr.SnapshotValidationError, ValueError)
    assert issubclass(sr.ConfigurationError, ValueError)
    assert issubclass(sr.SchemaNotReadyError, sr.StorageError)
    for error in (
        sr.SnapshotValidationError,
        sr.ConfigurationError,
        sr.VersionConflictError,
        sr.StorageError,
    ):
        assert issubclass(error, sr.SnapshotRepoError)


def test_snapshot_repr_redacts_user_and_state():
    shown = repr(sr.Snapshot(user_id="alice@example.com", state={"secret": "s3cr3t"}))
    assert "alic..." in shown
    assert "alice@example.com" not in shown
    assert "s3cr3t" not in shown


def test_stored_snapshots_behave_like_constructed_ones():
    """The repository's fast constructor gives the same object as pydantic's model_construct."""
    from datetime import UTC, datetime

    from pydantic import ValidationError

    from snapshot_repo.snapshot import stored_snapshot

    values = {
        "user_id": "u1",
        "state": Cart(items=["a"]),
        "version": 3,
        "created_at": datetime(2026, 1, 1, tzinfo=UTC),
        "schema_version": 1,
        "idempotency_key": "k",
        "actor": "svc",
        "reason": None,
        "metadata": {"n": 1},
    }
    fast = stored_snapshot(sr.Snapshot[Cart], dict(values))
    slow = sr.Snapshot[Cart].model_construct(**values)
    assert fast == slow
    assert fast.model_dump() == slow.model_dump()
    assert fast.model_dump_json() == slow.model_dump_json()
    assert fast.model_fields_set == slow.model_fields_set
    assert repr(fast) == repr(slow)
    assert hash(fast.model_copy(update={"version": 4}).version) == 4
    # Stored snapshots share one fields set (every field), which refuses changes;
    # copies, pickles and model_copy get sets of their own.
    other = stored_snapshot(sr.Snapshot[Cart], dict(values))
    assert fast.model_fields_set is other.model_fields_set
    assert fast.model_fields_set == set(sr.Snapshot.model_fields)
    with pytest.raises(TypeError, match="share one model_fields_set"):
        other.model_fields_set.discard("actor")
    with pytest.raises(TypeError, match="share one model_fields_set"):
        other.model_fields_set.update({"x"})
    shared = other.model_fields_set
    with pytest.raises(TypeError, match="share one model_fields_set"):
        shared |= {"x"}
    assert other.model_fields_set == set(sr.Snapshot.model_fields)
    for copy, version in (
        (other.model_copy(update={"version": 5}), 5),
        (other.model_copy(update={"version": 5}, deep=True), 5),
        (copy_module.copy(other), 3),
        (copy_module.deepcopy(other), 3),
    ):
        assert copy.model_dump() == {**other.model_dump(), "version": version}
        assert type(copy.model_fields_set) is set
        copy.model_fields_set.add("mine")  # its own set: the others' stay as they were
    assert "mine" not in other.model_fields_set
    assert type(pickle.loads(pickle.dumps(other.model_fields_set))) is set
    assert other.model_dump(exclude_unset=True).keys() == other.model_dump().keys()
    with pytest.raises(ValidationError):
        fast.version = 9  # frozen like any Snapshot
