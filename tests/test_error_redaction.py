"""Error messages never show a full user id or a piece of a state, yet say what failed.

Pydantic quotes the input in its errors (`input_value='jane.doe@...'`). The
library's own models hide it, and the codec never chains pydantic's error,
even as the suppressed `__context__`, since whatever walks a traceback (an
error tracker, `logging.exception` on some formatters) may print it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

import snapshot_repo as sr
from snapshot_repo.errors import redact
from tests.support.databases import Backend, Cart

USER_ID = "jane.doe@example.com"
CARD = "4111-1111-1111-1111"
BAD_STATE = {"items": f"card {CARD}"}


def chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception chained to it, as cause or as (even suppressed) context."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def texts(exc: BaseException) -> str:
    return "\n".join(f"{e!s}\n{e!r}" for e in chain(exc))


def assert_redacted(exc: BaseException, *secrets: str) -> None:
    shown = texts(exc)
    for secret in secrets:
        assert secret not in shown, f"{secret!r} leaked into {shown!r}"


@pytest.mark.parametrize(
    ("user_id", "reason"),
    [
        pytest.param(f"{USER_ID}\n", "control character", id="trailing-newline"),
        pytest.param(USER_ID + "x" * 236, "256 characters", id="256-characters"),
    ],
)
def test_building_a_snapshot_with_a_bad_user_id_does_not_echo_it(user_id: str, reason: str):
    with pytest.raises(ValueError, match="user_id") as caught:
        sr.Snapshot(user_id=user_id, state={})
    assert isinstance(caught.value, ValidationError)  # the documented type, unchanged
    assert reason in str(caught.value)
    assert_redacted(caught.value, USER_ID, "jane.doe")


def test_building_a_snapshot_with_a_bad_state_does_not_echo_it():
    with pytest.raises(ValidationError, match=r"state\.items") as caught:
        sr.Snapshot[Cart](user_id=USER_ID, state=BAD_STATE)
    assert "valid list" in str(caught.value)
    assert_redacted(caught.value, CARD, "card")


def test_parsing_a_snapshot_from_json_does_not_echo_it():
    with pytest.raises(ValidationError, match="user_id") as caught:
        sr.Snapshot[Cart].model_validate_json(
            f'{{"user_id": "{USER_ID}\\u0007", "state": {{"items": "card {CARD}"}}}}'
        )
    assert "state.items" in str(caught.value)
    assert_redacted(caught.value, USER_ID, CARD)


def package_models() -> list[type[BaseModel]]:
    models = []
    for info in pkgutil.walk_packages(sr.__path__, f"{sr.__name__}."):
        module = importlib.import_module(info.name)
        models.extend(
            value
            for value in vars(module).values()
            if isinstance(value, type)
            and issubclass(value, BaseModel)
            and value.__module__ == module.__name__
        )
    return models


def test_every_model_of_the_package_hides_its_input():
    models = package_models()
    assert {m.__name__ for m in models} >= {"Snapshot", "ErasureReceipt", "Change", "HealthReport"}
    assert [m.__name__ for m in models if not m.model_config.get("hide_input_in_errors")] == []


def unchecked(user_id: str, state: Any) -> sr.Snapshot[Any]:
    """A snapshot whose state is left for the repository's codec to validate."""
    return sr.Snapshot[Any](user_id=user_id, state=state)


async def test_the_codec_does_not_echo_a_state_of_the_users_own_model(
    repo: sr.SnapshotRepository[Cart],
):
    with pytest.raises(sr.SnapshotValidationError, match="items") as caught:
        await repo.upsert_latest(unchecked(USER_ID, BAD_STATE))
    assert "list_type" in str(caught.value)
    assert_redacted(caught.value, USER_ID, CARD)
    with pytest.raises(sr.SnapshotValidationError, match="items") as caught:
        await repo.upsert_many([unchecked(USER_ID, BAD_STATE)])
    assert_redacted(caught.value, USER_ID, CARD)
    assert await repo.get_latest(USER_ID) is None


async def test_the_codec_does_not_echo_a_state_that_is_not_a_json_object(
    json_repo: sr.SnapshotRepository[sr.JsonObject],
):
    with pytest.raises(sr.SnapshotValidationError, match="state") as caught:
        await json_repo.upsert_latest(unchecked(USER_ID, f"card {CARD}"))
    assert_redacted(caught.value, USER_ID, CARD)
    with pytest.raises(sr.SnapshotValidationError, match="metadata") as caught:
        await json_repo.upsert_latest(unchecked(USER_ID, {}), metadata=f"card {CARD}")  # type: ignore[arg-type]
    assert_redacted(caught.value, USER_ID, CARD)


async def test_a_stored_state_that_no_longer_validates_is_not_echoed(backend: Backend):
    """A row written as plain JSON and read with a model it does not fit (the model changed)."""
    async with sr.SnapshotRepository.from_url(backend.url) as json_repo:
        await json_repo.upsert_latest(sr.Snapshot(user_id=USER_ID, state=BAD_STATE))
    async with sr.SnapshotRepository.from_url(backend.url, Cart) as repo:
        with pytest.raises(sr.SnapshotValidationError, match="version 1") as caught:
            await repo.get_latest(USER_ID)
    assert "jane..." in str(caught.value)
    assert_redacted(caught.value, USER_ID, CARD)


@pytest.mark.parametrize(
    ("user_id", "shown"),
    [
        ("4711", "4..."),
        ("u1", "..."),
        ("a", "..."),
        ("", "..."),
        ("123456", "12..."),
        ("alice@example.com", "alic..."),
    ],
)
def test_a_redacted_id_shows_at_most_a_third_of_itself(user_id: str, shown: str):
    """Short ids were shown whole ("4711..."): now never more than a third, at most four."""
    assert redact(user_id) == shown
    if user_id:
        assert user_id not in redact(user_id)
