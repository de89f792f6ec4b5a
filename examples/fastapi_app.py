"""A web service on snapshot_repo: one shopping cart per user, over HTTP, with FastAPI.

Run it from the repository root (`pip install 'snapshot-repo[postgres]' fastapi uvicorn`):

    uvicorn examples.fastapi_app:app

Settings come from the environment when the app starts:

- `SNAPSHOT_REPO_URL`: the database (default `sqlite+aiosqlite:///snapshots.db`); the
  schema is migrated on start, which is idempotent and safe from several processes.
- `SNAPSHOT_REPO_ERASURE_KEY`: the secret (16 bytes or more) that keys erasure
  receipts. Without it, `DELETE` erases all the same but returns no receipt.

Endpoints:

- `GET /users/{user_id}/state`: the cart, with its version as a strong `ETag`
  (`"3"`); 404 if the user has none.
- `PUT /users/{user_id}/state`: store a new version (201 for a user's first,
  200 after). `If-Match: "3"` writes only if the cart is still at version 3
  (compare-and-set); `If-None-Match: *` only if the user has no cart yet. A lost
  race answers 409 Conflict with the current version. `Idempotency-Key: k`
  makes a retried PUT return the version its first attempt stored instead of
  writing again.
- `GET /users/{user_id}/history?limit=10&before_version=N`: versions, newest first.
- `DELETE /users/{user_id}`: erase every version (GDPR) and return the erasure
  receipt; 404 if there was nothing to erase and no earlier receipt.
- `GET /livez`: the process is up. `GET /readyz`: the database is reachable and
  migrated (the library's `health()` report), else 503.

Invalid input (a body that is not a `Cart`, a malformed `If-Match`, a limit out of
range, a user id the library refuses) answers 422; a database failure or timeout
503, whose outcome for a PUT is unknown: retry it with the same `Idempotency-Key`.

Versions restart at 1 after an erasure, so an `ETag` read before a `DELETE` can
match a new cart written after it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    Header,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
)
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import snapshot_repo as sr

__all__ = ["Cart", "CartItem", "app", "create_app"]

DEFAULT_URL = "sqlite+aiosqlite:///snapshots.db"
MAX_HISTORY_PAGE = 100

logger = logging.getLogger("examples.fastapi_app")


class CartItem(BaseModel):
    """One line of a cart."""

    model_config = ConfigDict(extra="forbid")

    sku: str = Field(min_length=1, max_length=64)
    quantity: int = Field(ge=1, le=999)


class Cart(BaseModel):
    """The state stored per user, validated on every write (and every read)."""

    model_config = ConfigDict(extra="forbid")

    items: list[CartItem] = Field(default_factory=list, max_length=100)
    currency: Literal["EUR", "GBP", "USD"] = "EUR"


class StoredCart(BaseModel):
    """A stored version of a user's cart."""

    user_id: str
    version: int
    created_at: datetime
    state: Cart

    @classmethod
    def of(cls, snapshot: sr.Snapshot[Cart]) -> StoredCart:
        return cls(
            user_id=snapshot.user_id,
            version=snapshot.version,
            created_at=snapshot.created_at,
            state=snapshot.state,
        )


class Receipt(BaseModel):
    """Proof of an erasure that names no one: `subject` is an HMAC of the user id."""

    subject: str
    erased_at: datetime
    versions_erased: int
    cause: str


class Erasure(BaseModel):
    """What a DELETE did: the versions it erased, and the newest receipt for the user."""

    versions_erased: int
    receipt: Receipt | None


UserId = Annotated[str, Path(min_length=1, max_length=255)]
IfMatch = Annotated[
    str | None,
    Header(pattern=r'^"[0-9]{1,18}"$', description='the ETag read, e.g. "3"'),
]
IfNoneMatch = Annotated[str | None, Header(pattern=r"^\*$", description="*: create only")]
IdempotencyKey = Annotated[str | None, Header(min_length=1, max_length=255)]


def _repository(request: Request) -> sr.SnapshotRepository[Cart]:
    """The repository the lifespan opened (a FastAPI dependency)."""
    repository: sr.SnapshotRepository[Cart] = request.app.state.repository
    return repository


Repository = Annotated[sr.SnapshotRepository[Cart], Depends(_repository)]

router = APIRouter()


@router.get("/users/{user_id}/state")
async def get_state(user_id: UserId, repository: Repository, response: Response) -> StoredCart:
    """The user's cart, its version as the ETag."""
    snapshot = await repository.get_latest(user_id)
    if snapshot is None:
        raise HTTPException(404, "no cart for this user")
    response.headers["ETag"] = _etag(snapshot.version)
    return StoredCart.of(snapshot)


@router.put("/users/{user_id}/state")
async def put_state(
    user_id: UserId,
    cart: Cart,
    repository: Repository,
    response: Response,
    if_match: IfMatch = None,
    if_none_match: IfNoneMatch = None,
    idempotency_key: IdempotencyKey = None,
) -> StoredCart:
    """Store the cart as the user's next version; If-Match / If-None-Match make it conditional."""
    if if_match is not None and if_none_match is not None:
        raise HTTPException(422, "send If-Match or If-None-Match, not both")
    expected = 0 if if_none_match is not None else None
    if if_match is not None:
        expected = int(if_match.strip('"'))
    stored = await repository.upsert_latest(
        sr.Snapshot(user_id=user_id, state=cart),
        expected_version=expected,
        idempotency_key=idempotency_key,
    )
    response.headers["ETag"] = _etag(stored.version)
    response.status_code = 201 if stored.version == 1 else 200
    return StoredCart.of(stored)


@router.get("/users/{user_id}/history")
async def get_history(
    user_id: UserId,
    repository: Repository,
    limit: Annotated[int, Query(ge=1, le=MAX_HISTORY_PAGE)] = 10,
    before_version: Annotated[int | None, Query(ge=1)] = None,
) -> list[StoredCart]:
    """Up to `limit` versions, newest first; page on with `before_version`."""
    history = await repository.get_history(user_id, limit, before_version=before_version)
    return [StoredCart.of(snapshot) for snapshot in history]


@router.delete("/users/{user_id}")
async def delete_user(user_id: UserId, request: Request, repository: Repository) -> Erasure:
    """Erase every version of the user's cart; the receipt proves it without naming them."""
    erased = await repository.delete(user_id)
    receipt = None
    if request.app.state.receipts:
        found = await repository.erasure_receipt(user_id)
        receipt = None if found is None else Receipt.model_validate(found.model_dump())
    if erased == 0 and receipt is None:
        raise HTTPException(404, "nothing stored for this user")
    return Erasure(versions_erased=erased, receipt=receipt)


@router.get("/livez")
async def livez() -> dict[str, str]:
    """Liveness: the process answers (the database is not asked)."""
    return {"status": "alive"}


@router.get("/readyz")
async def readyz(repository: Repository) -> JSONResponse:
    """Readiness: the database is reachable and migrated to this package's head, else 503."""
    report = await repository.health()  # never raises, bounded by health_timeout
    return JSONResponse(report.model_dump(mode="json"), 200 if report.healthy else 503)


def _etag(version: int) -> str:
    """A strong entity tag: the version in double quotes (RFC 9110, section 8.8.3)."""
    return f'"{version}"'


async def _version_conflict(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, sr.VersionConflictError)
    current = exc.actual_version or 0
    headers = {"ETag": _etag(current)} if current else {}
    return JSONResponse(
        {
            "detail": f"the cart is at version {current}, not {exc.expected_version}",
            "current_version": current,
        },
        409,
        headers,
    )


async def _invalid(_request: Request, exc: Exception) -> Response:
    # The library's messages and its models' errors never quote the input.
    if isinstance(exc, ValidationError):
        detail: Any = exc.errors(include_url=False, include_context=False, include_input=False)
    else:
        detail = str(exc)
    return JSONResponse({"detail": detail}, 422)


async def _storage_failed(_request: Request, exc: Exception) -> Response:
    logger.warning("storage failed: %s", exc)  # safe to log: user ids are redacted
    return JSONResponse({"detail": "storage unavailable, try again"}, 503, {"Retry-After": "1"})


def create_app(url: str | None = None, *, erasure_key: str | None = None) -> FastAPI:
    """The service on the database at `url` (default: `SNAPSHOT_REPO_URL`, read on start).

    `erasure_key` defaults to `SNAPSHOT_REPO_ERASURE_KEY`. The repository is
    opened and migrated when the app starts (its lifespan) and closed when it stops.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        database = url or os.environ.get("SNAPSHOT_REPO_URL", DEFAULT_URL)
        key = erasure_key or os.environ.get("SNAPSHOT_REPO_ERASURE_KEY") or None
        if key is None:
            logger.warning("SNAPSHOT_REPO_ERASURE_KEY is not set: erasures return no receipt")
        options: sr.RepositoryOptions = {"namespace": "cart"}
        if key is not None:
            options["erasure_key"] = key
        async with sr.SnapshotRepository.from_url(database, Cart, **options) as repository:
            await repository.migrate()
            app.state.repository = repository
            app.state.receipts = key is not None
            yield

    app = FastAPI(title="carts", lifespan=lifespan)
    app.add_exception_handler(sr.VersionConflictError, _version_conflict)
    app.add_exception_handler(sr.SnapshotValidationError, _invalid)
    app.add_exception_handler(ValidationError, _invalid)  # e.g. a user id a Snapshot refuses
    app.add_exception_handler(sr.StorageError, _storage_failed)
    app.include_router(router)
    return app


app = create_app()
