"""What a write accepts, reads return: states nested too deeply to read are refused on write.

Reads parse payloads with pydantic's JSON parser, which refuses more than
`MAX_JSON_DEPTH` levels of objects and arrays; writes go through pydantic's
Python validator and serializer, which allow 255. Between the two, a write
was acknowledged and every read of it failed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, ConfigDict, PlainSerializer, TypeAdapter
from pydantic_core import from_json

import snapshot_repo as sr
from snapshot_repo.codec import MAX_JSON_DEPTH, StateCodec, _may_nest_too_deeply
from tests.support.databases import Backend, Cart


class Reply(BaseModel):
    """An ordinary recursive model: a reply thread, one reply nested in the next."""

    text: str = ""
    reply: Reply | None = None


def thread(depth: int) -> dict[str, Any]:
    """A JSON object nesting `depth` objects, the innermost holding a value."""
    state: dict[str, Any] = {"text": "leaf"}
    for level in range(depth - 1):
        state = {"text": f"level {level}", "reply": state}
    return state


def arrays(depth: int) -> dict[str, Any]:
    """A JSON object holding arrays, `depth` levels in all, the innermost holding a value."""
    inner: Any = [1]
    for _ in range(depth - 2):
        inner = [inner]
    return {"rows": inner}


def json_text(depth: int) -> bytes:
    return b'{"a":' * (depth - 1) + b'{"a":1}' + b"}" * (depth - 1)


# The limit itself, pinned to the parser every read goes through.


def test_the_limit_is_the_readers():
    for parse in (
        from_json,
        TypeAdapter(sr.JsonObject).validate_json,
        TypeAdapter(dict[str, Any]).validate_json,
    ):
        parse(json_text(MAX_JSON_DEPTH))
        with pytest.raises(ValueError, match="recursion limit"):
            parse(json_text(MAX_JSON_DEPTH + 1))
    Reply.model_validate_json(TypeAdapter(Reply).dump_json(Reply(**thread(MAX_JSON_DEPTH))))
    with pytest.raises(ValueError, match="recursion limit"):
        Reply.model_validate_json(json_text(MAX_JSON_DEPTH + 1).replace(b'"a"', b'"reply"'))


def test_the_writer_could_go_deeper_than_the_reader():
    """The root cause: without the check, pydantic writes what it cannot read back."""
    deep = Reply(**thread(MAX_JSON_DEPTH + 50))
    payload = TypeAdapter(Reply).dump_json(deep)
    with pytest.raises(ValueError, match="recursion limit"):
        Reply.model_validate_json(payload)


# Which state types need the check on every write (the rest cost nothing).


class Flat(BaseModel):
    items: list[Cart] = []
    by_name: dict[str, tuple[int, list[str]]] = {}


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class Custom(BaseModel):
    value: Annotated[int, PlainSerializer(lambda v: [[v]])] = 0


class Anything(BaseModel):
    value: Any = None


@pytest.mark.parametrize(
    ("state_type", "checked"),
    [
        (Cart, False),
        (Flat, False),
        (Reply, True),
        (sr.JsonObject, True),
        (dict[str, Any], True),
        (Loose, True),
        (Custom, True),
        (Anything, True),
    ],
)
def test_only_types_that_can_nest_without_bound_are_checked(state_type: Any, checked: bool):
    assert _may_nest_too_deeply(state_type) is checked


def test_a_deep_state_of_a_model_with_extra_fields_is_refused():
    codec: StateCodec[Loose] = StateCodec(Loose)
    with pytest.raises(sr.SnapshotValidationError, match="201 levels deep"):
        codec.encode(codec.validate({"x": thread(MAX_JSON_DEPTH)}, "jane"), "jane")


# On both databases, through the public methods.


@pytest.fixture
async def reply_repo(backend: Backend) -> AsyncIterator[sr.SnapshotRepository[Reply]]:
    async with sr.SnapshotRepository.from_url(backend.url, Reply) as repository:
        yield repository


@pytest.fixture(params=["recursive-model", "plain-json"])
async def any_repo(
    request: pytest.FixtureRequest, backend: Backend
) -> AsyncIterator[sr.SnapshotRepository[Any]]:
    """A repository of a recursive model, and one of plain JSON."""
    state_type = Reply if request.param == "recursive-model" else None
    async with sr.SnapshotRepository.from_url(backend.url, state_type) as repository:
        yield repository


@pytest.mark.parametrize("depth", [150, MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH])
async def test_a_state_within_the_limit_round_trips(any_repo: sr.SnapshotRepository[Any], depth):
    stored = await any_repo.upsert_latest(sr.Snapshot(user_id="u", state=thread(depth)))
    assert await any_repo.get_latest("u") == stored
    [version] = await any_repo.get_history("u", limit=1)
    assert version == stored


async def test_arrays_within_the_limit_round_trip(json_repo: sr.SnapshotRepository[Any]):
    stored = await json_repo.upsert_latest(sr.Snapshot(user_id="u", state=arrays(MAX_JSON_DEPTH)))
    assert await json_repo.get_latest("u") == stored


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 230, 253])
async def test_a_state_over_the_limit_is_refused_on_write(
    any_repo: sr.SnapshotRepository[Any], depth: int
):
    with pytest.raises(sr.SnapshotValidationError, match=f"{depth} levels deep") as caught:
        await any_repo.upsert_latest(sr.Snapshot(user_id="u", state=thread(depth)))
    assert f"at most {MAX_JSON_DEPTH}" in str(caught.value)
    assert await any_repo.get_latest("u") is None


async def test_arrays_over_the_limit_are_refused_on_write(json_repo: sr.SnapshotRepository[Any]):
    with pytest.raises(sr.SnapshotValidationError, match=f"{MAX_JSON_DEPTH + 1} levels deep"):
        await json_repo.upsert_latest(sr.Snapshot(user_id="u", state=arrays(MAX_JSON_DEPTH + 1)))
    assert await json_repo.get_latest("u") is None


@pytest.mark.parametrize("depth", [256, 400])
async def test_a_state_past_pydantics_own_limit_is_refused_alike(
    any_repo: sr.SnapshotRepository[Any], depth: int
):
    with pytest.raises(sr.SnapshotValidationError, match=f"more than {MAX_JSON_DEPTH} levels"):
        await any_repo.upsert_latest(sr.Snapshot(user_id="u", state=thread(depth)))
    assert await any_repo.get_latest("u") is None


async def test_a_deep_model_instance_is_refused_on_write(reply_repo: sr.SnapshotRepository[Reply]):
    """Instances pass validation as they are: the payload is what gets checked."""
    deep = Reply()
    for _ in range(MAX_JSON_DEPTH):
        deep = Reply(reply=deep)
    with pytest.raises(sr.SnapshotValidationError, match=f"{MAX_JSON_DEPTH + 1} levels deep"):
        await reply_repo.upsert_latest(sr.Snapshot(user_id="u", state=deep))
    assert await reply_repo.get_latest("u") is None


async def test_upsert_many_refuses_the_whole_batch(any_repo: sr.SnapshotRepository[Any]):
    batch = [
        sr.Snapshot(user_id="shallow", state=thread(3)),
        sr.Snapshot(user_id="deep", state=thread(MAX_JSON_DEPTH + 1)),
    ]
    with pytest.raises(sr.SnapshotValidationError, match=f"{MAX_JSON_DEPTH + 1} levels deep"):
        await any_repo.upsert_many(batch)
    assert await any_repo.get_latest_many(["shallow", "deep"]) == {}


async def test_metadata_over_the_limit_is_refused_on_write(repo: sr.SnapshotRepository[Cart]):
    with pytest.raises(sr.SnapshotValidationError, match=f"metadata .* {MAX_JSON_DEPTH + 1}"):
        await repo.upsert_latest(
            sr.Snapshot(user_id="u", state=Cart()), metadata=thread(MAX_JSON_DEPTH + 1)
        )
    assert await repo.get_latest("u") is None
    stored = await repo.upsert_latest(
        sr.Snapshot(user_id="u", state=Cart()), metadata=thread(MAX_JSON_DEPTH)
    )
    assert await repo.get_latest("u") == stored
