"""examples/fastapi_app.py: the web service, through httpx on SQLite and Postgres, and uvicorn."""

from __future__ import annotations

import hashlib
import hmac
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from examples.fastapi_app import create_app
from tests.support.databases import PostgresServer, admin, run_blocking

ROOT = Path(__file__).resolve().parent.parent
ERASURE_KEY = "a test erasure key of enough bytes"
CART = {"items": [{"sku": "tea", "quantity": 2}], "currency": "EUR"}
STARTUP_SECONDS = 15.0


@pytest.fixture
def database_url(sqlite_or_postgres_url: str) -> str:
    return sqlite_or_postgres_url


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client of `app`, in-process, with the app's lifespan (startup, shutdown) around it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://carts") as client:
            yield client


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(create_app(database_url, erasure_key=ERASURE_KEY)) as client:
        yield client


def cart(*skus: str) -> dict[str, Any]:
    return {"items": [{"sku": sku, "quantity": 1} for sku in skus]}


# --- state, ETags, compare-and-set ---------------------------------------------------------


async def test_put_then_get_returns_the_state_with_its_version_as_etag(
    client: httpx.AsyncClient,
):
    created = await client.put("/users/alice/state", json=CART)
    assert created.status_code == 201  # the user's first version
    assert created.headers["ETag"] == '"1"'
    assert created.json()["state"] == CART
    assert created.json()["version"] == 1

    read = await client.get("/users/alice/state")
    assert read.status_code == 200
    assert read.headers["ETag"] == '"1"'
    assert read.json() == created.json()

    updated = await client.put("/users/alice/state", json=cart("milk"))
    assert (updated.status_code, updated.headers["ETag"]) == (200, '"2"')
    assert (await client.get("/users/bob/state")).status_code == 404


async def test_if_match_is_compare_and_set_and_a_lost_race_is_409(client: httpx.AsyncClient):
    await client.put("/users/alice/state", json=cart("a"))
    won = await client.put("/users/alice/state", json=cart("b"), headers={"If-Match": '"1"'})
    assert (won.status_code, won.headers["ETag"]) == (200, '"2"')

    lost = await client.put("/users/alice/state", json=cart("stale"), headers={"If-Match": '"1"'})
    assert lost.status_code == 409
    assert lost.json()["current_version"] == 2
    assert lost.headers["ETag"] == '"2"'
    read = await client.get("/users/alice/state")
    assert read.json()["state"] == {**cart("b"), "currency": "EUR"}  # nothing was written

    only_new = {"If-None-Match": "*"}
    assert (
        await client.put("/users/alice/state", json=cart(), headers=only_new)
    ).status_code == 409
    assert (await client.put("/users/bob/state", json=cart(), headers=only_new)).status_code == 201
    missing = await client.put("/users/carol/state", json=cart(), headers={"If-Match": '"4"'})
    assert (missing.status_code, missing.json()["current_version"]) == (409, 0)
    assert "ETag" not in missing.headers


async def test_a_retried_put_with_its_idempotency_key_writes_once(client: httpx.AsyncClient):
    headers = {"Idempotency-Key": "order-17"}
    first = await client.put("/users/alice/state", json=cart("a"), headers=headers)
    again = await client.put("/users/alice/state", json=cart("a"), headers=headers)
    assert first.json() == again.json()
    history = await client.get("/users/alice/history")
    assert [entry["version"] for entry in history.json()] == [1]


async def test_invalid_input_is_422_and_writes_nothing(client: httpx.AsyncClient):
    bad_bodies: list[Any] = [
        {"items": [{"sku": "tea", "quantity": 0}]},  # out of range
        {"items": [{"sku": "tea", "quantity": 1}], "colour": "red"},  # unknown field
        {"items": "tea"},
        {"currency": "XYZ"},
        [],
    ]
    for body in bad_bodies:
        response = await client.put("/users/alice/state", json=body)
        assert response.status_code == 422, body
    for if_match in ('W/"1"', "1", '"one"', '"1", "2"', "*"):
        response = await client.put(
            "/users/alice/state", json=cart(), headers={"If-Match": if_match}
        )
        assert response.status_code == 422, if_match
    both = {"If-Match": '"1"', "If-None-Match": "*"}
    assert (await client.put("/users/alice/state", json=cart(), headers=both)).status_code == 422
    for user_id in ("bad%01id", "x" * 256):  # a control character; too long
        response = await client.put(f"/users/{user_id}/state", json=cart())
        assert response.status_code == 422, user_id
        assert (await client.get(f"/users/{user_id}/state")).status_code == 422
    for query in ("limit=0", "limit=101", "limit=ten", "before_version=0"):
        assert (await client.get(f"/users/alice/history?{query}")).status_code == 422, query
    assert (await client.get("/users/alice/state")).status_code == 404  # nothing was written


# --- history and erasure ---------------------------------------------------------------------


async def test_history_is_newest_first_within_the_limit(client: httpx.AsyncClient):
    for i in range(5):
        await client.put("/users/alice/state", json=cart(f"item-{i}"))
    page = await client.get("/users/alice/history", params={"limit": 3})
    assert page.status_code == 200
    assert [entry["version"] for entry in page.json()] == [5, 4, 3]
    assert page.json()[0]["state"]["items"] == [{"sku": "item-4", "quantity": 1}]
    rest = await client.get("/users/alice/history", params={"limit": 3, "before_version": 3})
    assert [entry["version"] for entry in rest.json()] == [2, 1]
    assert (await client.get("/users/nobody/history")).json() == []


async def test_delete_erases_and_returns_the_receipt(client: httpx.AsyncClient):
    await client.put("/users/alice/state", json=cart("a"))
    await client.put("/users/alice/state", json=cart("b"))

    erased = await client.delete("/users/alice")
    assert erased.status_code == 200
    body = erased.json()
    assert body["versions_erased"] == 2
    receipt = body["receipt"]
    subject = hmac.new(ERASURE_KEY.encode(), b"alice", hashlib.sha256).hexdigest()
    assert (receipt["subject"], receipt["versions_erased"], receipt["cause"]) == (
        subject,
        2,
        "delete",
    )
    assert "alice" not in erased.text

    assert (await client.get("/users/alice/state")).status_code == 404
    assert (await client.get("/users/alice/history")).json() == []
    again = await client.delete("/users/alice")  # a retried DELETE shows the same proof
    assert (again.status_code, again.json()) == (200, {"versions_erased": 0, "receipt": receipt})
    assert (await client.delete("/users/nobody")).status_code == 404


# --- probes ----------------------------------------------------------------------------------


async def test_probes_report_ready_and_503_once_storage_is_gone(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str
):
    # A database the app migrates itself on start, then loses while it runs.
    lose: Callable[[], None]
    if database_url.startswith("sqlite"):
        path = tmp_path / "fresh.db"
        url = f"sqlite+aiosqlite:///{path}"

        def lose() -> None:
            for file in tmp_path.glob("fresh.db*"):
                file.unlink()
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = server.create_database()

        def lose() -> None:
            database = url.rsplit("/", 1)[1]
            run_blocking(admin(database_url, f'DROP DATABASE "{database}" WITH (FORCE)'))

    async with serving(create_app(url, erasure_key=ERASURE_KEY)) as client:
        assert (await client.get("/livez")).json() == {"status": "alive"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["healthy"] is True
        assert ready.json()["database_revision"] == ready.json()["head_revision"]

        lose()
        gone = await client.get("/readyz")
        assert gone.status_code == 503
        assert gone.json()["healthy"] is False
        assert gone.json()["error"]
        assert (await client.get("/livez")).status_code == 200  # the process is still up


# --- a real server -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_the_app_serves_under_uvicorn_and_stops_cleanly(tmp_path: Path):
    port = free_port()
    environment = {
        **os.environ,
        "SNAPSHOT_REPO_URL": f"sqlite+aiosqlite:///{tmp_path / 'served.db'}",
        "SNAPSHOT_REPO_ERASURE_KEY": ERASURE_KEY,
    }
    command = [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1"],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:

            def ready() -> bool:
                try:
                    return http.get("/readyz").status_code == 200
                except httpx.TransportError:  # not listening yet
                    return False

            deadline = time.monotonic() + STARTUP_SECONDS
            while not ready():
                assert server.poll() is None, "uvicorn exited before it was ready"
                assert time.monotonic() < deadline, f"not ready within {STARTUP_SECONDS} s"
                time.sleep(0.05)
            stored = http.put("/users/alice/state", json=CART)
            assert (stored.status_code, stored.headers["ETag"]) == (201, '"1"')
            read = http.get("/users/alice/state")
            assert (read.status_code, read.json()["state"]) == (200, CART)
        server.send_signal(signal.SIGTERM)  # what an orchestrator sends to stop a pod
        output, _ = server.communicate(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    # Uvicorn shuts down gracefully, then re-raises the SIGTERM it caught, so that the
    # exit status says what stopped it; 0 is what older versions return.
    assert server.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete." in output
    assert "Traceback" not in output
