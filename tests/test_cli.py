"""The `snapshot-repo` console script, in-process through `main()` and as a real subprocess.

Tests that touch a database take the `backend` fixture, so they run on
SQLite, on Postgres and on MariaDB. Exit statuses are written as literals on purpose:
they are a public contract that scripts and probes rely on.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from snapshot_repo.cli import main
from snapshot_repo.migrate import head_revision
from snapshot_repo.subject_access import SUBJECT_EXPORT_FORMAT
from tests.support.databases import Backend

PREFIX = "snapshot-repo: error: "
UNREACHABLE = {
    "postgres": lambda tmp: "postgresql+asyncpg://postgres@127.0.0.1:1/x",
    "mariadb": lambda tmp: "mariadb+asyncmy://root@127.0.0.1:1/x",
    "sqlite": lambda tmp: f"sqlite+aiosqlite:///{tmp / 'no-such-dir' / 'x.db'}",
}


@dataclass
class Result:
    status: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.out.endswith("\n")
        assert self.out.count("\n") == 1, f"expected one line of output, got {self.out!r}"
        return json.loads(self.out)

    def error(self) -> str:
        """The one-line error message, without its prefix."""
        assert "Traceback" not in self.err
        assert self.err.startswith(PREFIX), self.err
        assert self.err.count("\n") == 1, f"expected one line on stderr, got {self.err!r}"
        return self.err.removeprefix(PREFIX).rstrip("\n")


Cli = Callable[..., Result]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The default URL is a file in the working directory: keep it out of the checkout.
    monkeypatch.delenv("SNAPSHOT_REPO_URL", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """Run `main(argv)` with `stdin` as standard input; return status and captured output."""

    def run(*argv: str, stdin: str = "") -> Result:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        status = main(list(argv))
        out, err = capsys.readouterr()
        return Result(status, out, err)

    return run


def _put(cli: Cli, url: str, user_id: str, state: object, *options: str) -> dict[str, Any]:
    result = cli("--url", url, "put", user_id, *options, stdin=json.dumps(state))
    assert result.status == 0, result.err
    snapshot: dict[str, Any] = result.json()
    return snapshot


def test_migrate_makes_a_fresh_database_healthy(backend: Backend, cli: Cli) -> None:
    url = backend.fresh_url()

    before = cli("--url", url, "health")
    assert (before.status, before.json()["healthy"]) == (1, False)
    assert before.json()["database_revision"] is None
    not_ready = cli("--url", url, "get", "alice")
    assert not_ready.status == 3
    assert "snapshot-repo migrate" in not_ready.error()

    migrated = cli("--url", url, "migrate")
    assert migrated.status == 0, migrated.err
    assert migrated.out.count("\n") == 1
    assert f"revision {head_revision()}" in migrated.out

    after = cli("--url", url, "health")
    report = after.json()
    assert (after.status, report["healthy"], report["reachable"]) == (0, True, True)
    assert report["database_revision"] == report["head_revision"] == head_revision()
    assert report["latency_ms"] > 0
    again = cli("--url", url, "migrate")
    assert again.status == 0, "migrate must be idempotent"
    assert _put(cli, url, "alice", {"a": 1})["version"] == 1


def test_put_from_stdin_prints_the_stored_snapshot(backend: Backend, cli: Cli) -> None:
    first = _put(cli, backend.url, "alice", {"items": ["apple"], "note": "é\u00a0\U0001f600"})
    assert first["user_id"] == "alice"
    assert first["version"] == 1
    assert first["schema_version"] == 1
    assert first["state"] == {"items": ["apple"], "note": "é\u00a0\U0001f600"}
    created_at = datetime.fromisoformat(first["created_at"])
    assert created_at.utcoffset() == timedelta(0)

    got = cli("--url", backend.url, "get", "alice")
    assert got.status == 0, got.err
    assert got.json() == first

    second = _put(cli, backend.url, "alice", {"items": []})
    assert second["version"] == 2
    assert cli("--url", backend.url, "get", "alice").json() == second


def test_put_stores_the_given_schema_version(backend: Backend, cli: Cli) -> None:
    stored = _put(cli, backend.url, "alice", {"v": 3}, "--schema-version", "3")
    assert (stored["version"], stored["schema_version"], stored["state"]) == (1, 3, {"v": 3})


def test_get_reads_a_state_of_any_schema_version(backend: Backend, cli: Cli) -> None:
    stored = _put(cli, backend.url, "alice", {"v": 3}, "--schema-version", "3")
    got = cli("--url", backend.url, "get", "alice")
    assert (got.status, got.json()) == (0, stored)


def test_put_from_file(backend: Backend, cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"note": "ünïcode"}, ensure_ascii=False), encoding="utf-8")

    put = cli("--url", backend.url, "put", "bob", "--file", str(path), stdin="not read")
    assert put.status == 0, put.err
    assert put.json()["state"] == {"note": "ünïcode"}
    assert cli("--url", backend.url, "get", "bob").json() == put.json()


def test_put_from_an_unreadable_file_is_bad_input(
    backend: Backend, cli: Cli, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.json"
    result = cli("--url", backend.url, "put", "bob", "--file", str(missing))
    assert result.status == 2
    assert str(missing) in result.error()
    assert result.out == ""
    assert cli("--url", backend.url, "get", "bob").status == 1


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Interrupted(io.StringIO):
    def read(self, size: int | None = -1) -> str:
        raise KeyboardInterrupt


def test_stdin_at_a_terminal_closed_or_interrupted(
    backend: Backend,
    cli: Cli,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sys.stdin", _Terminal('{"typed": true}'))
    assert main(["--url", backend.url, "put", "kim"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["state"] == {"typed": True}
    assert "reading the state from stdin" in err, "no hint for a user typing at a terminal"

    monkeypatch.setattr("sys.stdin", None)
    assert main(["--url", backend.url, "put", "kim"]) == 2
    assert "stdin is closed" in Result(2, *capsys.readouterr()).error()

    monkeypatch.setattr("sys.stdin", _Interrupted())
    assert main(["--url", backend.url, "put", "kim"]) == 130
    assert capsys.readouterr().err == ""

    assert cli("--url", backend.url, "get", "kim").json()["version"] == 1, "a failed put wrote"


def test_get_of_a_user_without_snapshot_exits_1(backend: Backend, cli: Cli) -> None:
    result = cli("--url", backend.url, "get", "nobody")
    assert result.status == 1
    assert result.out == ""
    assert "no snapshot" in result.error()


def test_history_is_newest_first_and_limited(backend: Backend, cli: Cli) -> None:
    for n in range(1, 13):
        _put(cli, backend.url, "carol", {"n": n})

    default = cli("--url", backend.url, "history", "carol")
    assert default.status == 0, default.err
    snapshots = default.json()
    assert [s["version"] for s in snapshots] == list(range(12, 2, -1))
    assert [s["state"] for s in snapshots] == [{"n": n} for n in range(12, 2, -1)]

    limited = cli("--url", backend.url, "history", "carol", "--limit", "3")
    assert [s["version"] for s in limited.json()] == [12, 11, 10]

    assert cli("--url", backend.url, "history", "nobody").json() == []


def test_delete_prints_how_many_versions_were_erased(backend: Backend, cli: Cli) -> None:
    for n in range(3):
        _put(cli, backend.url, "dave", {"n": n})
    _put(cli, backend.url, "erin", {"n": 0})

    first = cli("--url", backend.url, "delete", "dave")
    assert (first.status, first.json()) == (0, 3)
    second = cli("--url", backend.url, "delete", "dave")
    assert (second.status, second.json()) == (0, 0)

    assert cli("--url", backend.url, "get", "dave").status == 1
    assert cli("--url", backend.url, "history", "dave").json() == []
    assert cli("--url", backend.url, "get", "erin").status == 0, "another user was erased"


def test_expected_version_conflict_exits_4_and_writes_nothing(backend: Backend, cli: Cli) -> None:
    created = _put(cli, backend.url, "frank", {"n": 1}, "--expected-version", "0")
    assert created["version"] == 1

    lost = cli("--url", backend.url, "put", "frank", "--expected-version", "0", stdin='{"n": 2}')
    assert lost.status == 4
    assert lost.out == ""
    assert "expected version 0, found 1" in lost.error()
    assert cli("--url", backend.url, "get", "frank").json()["state"] == {"n": 1}

    won = _put(cli, backend.url, "frank", {"n": 3}, "--expected-version", "1")
    assert won["version"] == 2

    negative = cli("--url", backend.url, "put", "frank", "--expected-version", "-1", stdin="{}")
    assert negative.status == 2
    assert "expected_version" in negative.error()


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        pytest.param("{", "not valid JSON", id="truncated"),
        pytest.param("", "not valid JSON", id="empty"),
        pytest.param("[1]", "must hold a JSON object, not an array", id="array"),
        pytest.param('"x"', "must hold a JSON object, not a string", id="string"),
        pytest.param("null", "must hold a JSON object, not null", id="null"),
        pytest.param("3.5", "must hold a JSON object, not a number", id="number"),
        pytest.param('{"a": NaN}', "NaN", id="nan"),
    ],
)
def test_bad_state_is_refused_with_exit_2(
    backend: Backend, cli: Cli, stdin: str, message: str
) -> None:
    result = cli("--url", backend.url, "put", "gina", stdin=stdin)
    assert result.status == 2
    assert result.out == ""
    assert message in result.error()
    assert cli("--url", backend.url, "get", "gina").status == 1, "a refused state was written"


@pytest.mark.parametrize(
    "user_id",
    [
        pytest.param("", id="empty"),
        pytest.param("a\x01b", id="control-char"),
        pytest.param("x" * 256, id="too-long"),
    ],
)
@pytest.mark.parametrize("command", ["put", "get", "history", "delete"])
def test_bad_user_id_is_refused_with_exit_2(
    backend: Backend, cli: Cli, command: str, user_id: str
) -> None:
    result = cli("--url", backend.url, command, user_id, stdin="{}")
    assert result.status == 2
    assert result.out == ""
    assert "user_id" in result.error()


def test_out_of_range_numbers_are_bad_input(backend: Backend, cli: Cli) -> None:
    limit = cli("--url", backend.url, "history", "hank", "--limit", "0")
    assert limit.status == 2
    assert "limit" in limit.error()

    schema = cli("--url", backend.url, "put", "hank", "--schema-version", "0", stdin="{}")
    assert schema.status == 2
    assert "schema_version" in schema.error()
    assert cli("--url", backend.url, "get", "hank").status == 1


@pytest.mark.parametrize(
    "argv",
    [["migrate"], ["put", "u"], ["get", "u"], ["history", "u"], ["delete", "u"], ["health"]],
    ids=lambda argv: argv[0],
)
@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("oracle://x/y", "unsupported database URL", id="oracle"),
        pytest.param("not a url", "not a database URL", id="garbage"),
    ],
)
def test_unsupported_url_is_bad_input(cli: Cli, argv: list[str], url: str, message: str) -> None:
    result = cli("--url", url, *argv, stdin="{}")
    assert result.status == 2
    assert result.out == ""
    assert message in result.error()


@pytest.mark.parametrize("kind", sorted(UNREACHABLE))
def test_unreachable_database_fails_fast(cli: Cli, tmp_path: Path, kind: str) -> None:
    url = UNREACHABLE[kind](tmp_path)

    started = time.monotonic()
    health = cli("--url", url, "health")
    assert (health.status, health.json()["healthy"], health.json()["reachable"]) == (
        1,
        False,
        False,
    )
    assert time.monotonic() - started < 10

    for argv in (["migrate"], ["put", "u"], ["get", "u"], ["history", "u"], ["delete", "u"]):
        started = time.monotonic()
        result = cli("--url", url, *argv, stdin="{}")
        assert result.status == 3, (argv, result)
        assert result.out == ""
        assert result.error()
        assert time.monotonic() - started < 10, f"{argv} took too long"
    assert not (tmp_path / "no-such-dir").exists()


def test_environment_url_is_used_and_url_option_wins(
    backend: Backend, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SNAPSHOT_REPO_URL", backend.url)
    put = cli("put", "ivy", stdin='{"from": "env"}')
    assert put.status == 0, put.err

    monkeypatch.setenv("SNAPSHOT_REPO_URL", "oracle://x/y")  # an unsupported database
    assert cli("get", "ivy").status == 2, "the environment variable was not read"
    before = cli("--url", backend.url, "get", "ivy")
    after = cli("get", "ivy", "--url", backend.url)
    assert before.status == after.status == 0
    assert before.json() == after.json() == put.json()


def test_default_url_is_snapshots_db_in_the_working_directory(cli: Cli, tmp_path: Path) -> None:
    assert cli("migrate").status == 0
    assert (tmp_path / "snapshots.db").is_file()
    assert cli("health").status == 0


def test_help_documents_the_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as help_exit:
        main(["--help"])
    assert help_exit.value.code == 0
    out = capsys.readouterr().out
    assert "SNAPSHOT_REPO_URL" in out
    for status in ("0    success", "1    not found", "2    usage error", "3    storage failure"):
        assert status in out
    assert "4    version conflict" in out

    with pytest.raises(SystemExit) as usage_exit:
        main([])
    assert usage_exit.value.code == 2
    assert "required" in capsys.readouterr().err


def _console(*argv: str, stdin: str = "", cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if name != "SNAPSHOT_REPO_URL"}
    return subprocess.run(
        [sys.executable, "-m", "snapshot_repo.cli", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def _one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(PREFIX)
    return lines[0]


def test_console_script_end_to_end(backend: Backend, tmp_path: Path) -> None:
    put = _console("--url", backend.url, "put", "jack", stdin='{"n": 1}', cwd=tmp_path)
    assert put.returncode == 0, put.stderr
    assert json.loads(put.stdout)["state"] == {"n": 1}

    got = _console("--url", backend.url, "get", "jack", cwd=tmp_path)
    assert (got.returncode, json.loads(got.stdout)) == (0, json.loads(put.stdout))

    missing = _console("--url", backend.url, "get", "nobody", cwd=tmp_path)
    assert missing.returncode == 1
    _one_line_error(missing.stderr)

    bad_json = _console("--url", backend.url, "put", "jack", stdin="{oops", cwd=tmp_path)
    assert bad_json.returncode == 2
    assert "not valid JSON" in _one_line_error(bad_json.stderr)

    not_object = _console("--url", backend.url, "put", "jack", stdin="[1]", cwd=tmp_path)
    assert not_object.returncode == 2
    _one_line_error(not_object.stderr)

    conflict = _console(
        "--url", backend.url, "put", "jack", "--expected-version", "0", stdin="{}", cwd=tmp_path
    )
    assert conflict.returncode == 4
    _one_line_error(conflict.stderr)

    healthy = _console("--url", backend.url, "health", cwd=tmp_path)
    assert (healthy.returncode, json.loads(healthy.stdout)["healthy"]) == (0, True)


def test_console_script_on_bad_configuration(tmp_path: Path) -> None:
    unsupported = _console("--url", "oracle://x/y", "get", "u", cwd=tmp_path)
    assert unsupported.returncode == 2
    _one_line_error(unsupported.stderr)

    unreachable = UNREACHABLE["postgres"](tmp_path)
    health = _console("--url", unreachable, "health", cwd=tmp_path)
    assert health.returncode == 1
    assert json.loads(health.stdout)["healthy"] is False
    assert "Traceback" not in health.stderr

    get = _console("--url", unreachable, "get", "u", cwd=tmp_path)
    assert get.returncode == 3
    assert "ConnectionRefusedError" in _one_line_error(get.stderr)

    usage = _console(cwd=tmp_path)
    assert usage.returncode == 2
    assert "Traceback" not in usage.stderr


def test_put_with_write_options_and_scope(backend: Backend, cli: Cli) -> None:
    first = _put(
        cli,
        backend.url,
        "u",
        {"a": 1},
        "--idempotency-key",
        "k1",
        "--actor",
        "ops",
        "--reason",
        "fix",
        "--namespace",
        "cart",
        "--tenant",
        "acme",
    )
    again = _put(
        cli,
        backend.url,
        "u",
        {"a": 2},
        "--idempotency-key",
        "k1",
        "--namespace",
        "cart",
        "--tenant",
        "acme",
    )
    assert again == first
    assert (first["actor"], first["reason"], first["idempotency_key"]) == ("ops", "fix", "k1")
    assert cli("--url", backend.url, "get", "u").status == 1  # other scope
    scoped = cli("--url", backend.url, "get", "u", "--namespace", "cart", "--tenant", "acme")
    assert scoped.json() == first


def test_put_with_ttl_then_reap(backend: Backend, cli: Cli) -> None:
    _put(cli, backend.url, "brief", {"a": 1}, "--ttl", "0")
    _put(cli, backend.url, "stays", {"a": 1})
    assert cli("--url", backend.url, "get", "brief").status == 1  # expired reads as absent
    reaped = cli("--url", backend.url, "reap")
    assert (reaped.status, reaped.out.strip()) == (0, "1")
    assert cli("--url", backend.url, "get", "stays").status == 0
    bad = cli("--url", backend.url, "put", "x", "--ttl", "-1", stdin="{}")
    assert bad.status == 2
    assert "ttl" in bad.error()


def test_export_writes_every_version(backend: Backend, cli: Cli, tmp_path: Path) -> None:
    for n in range(3):
        _put(cli, backend.url, "person", {"n": n}, "--actor", "svc")
    target = tmp_path / "export.jsonl"
    result = cli("--url", backend.url, "export", "person", "--output", str(target))
    assert result.status == 0, result.err
    header, *versions = [json.loads(line) for line in target.read_text().splitlines()]
    assert header["user_id"] == "person"
    assert [(v["version"], v["state"], v["actor"]) for v in versions] == [
        (3, {"n": 2}, "svc"),
        (2, {"n": 1}, "svc"),
        (1, {"n": 0}, "svc"),
    ]
    to_stdout = cli("--url", backend.url, "export", "person")
    assert len(to_stdout.out.splitlines()) == 4


def test_prune_keeps_the_newest(backend: Backend, cli: Cli) -> None:
    for n in range(5):
        _put(cli, backend.url, "p", {"n": n})
    _put(cli, backend.url, "q", {"n": 0})
    result = cli("--url", backend.url, "prune", "--keep-last", "2")
    assert (result.status, result.out.strip()) == (0, "3")
    history = cli("--url", backend.url, "history", "p").json()
    assert [s["version"] for s in history] == [5, 4]
    missing_bound = cli("--url", backend.url, "prune")
    assert missing_bound.status == 2


def test_upgrade_payloads_with_the_applications_upgraders(backend: Backend, cli: Cli) -> None:
    _put(cli, backend.url, "u", {"items": ["a", "b"]})
    result = cli(
        "--url",
        backend.url,
        "upgrade-payloads",
        "--schema-version",
        "2",
        "--upgraders",
        "tests.cli_upgraders:UPGRADERS",
    )
    assert (result.status, result.out.strip()) == (0, "2")  # the history row and the latest row
    latest = cli("--url", backend.url, "get", "u").json()
    assert (latest["schema_version"], latest["state"]) == (
        2,
        {"lines": [{"sku": "a"}, {"sku": "b"}]},
    )
    bad = cli(
        "--url",
        backend.url,
        "upgrade-payloads",
        "--schema-version",
        "2",
        "--upgraders",
        "no_such_module:X",
    )
    assert bad.status == 2


def test_the_benchmark_is_not_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    """The installed CLI is for operators: the benchmark is a developer tool of the checkout."""
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "bench" not in capsys.readouterr().out


def test_the_benchmark_runs_from_a_checkout(tmp_path: Path) -> None:
    """`python benchmarks/run.py` works from any directory, on the checkout's own package."""
    run = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
    result = subprocess.run(
        [sys.executable, str(run), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python benchmarks/run.py")
    for flag in ("--backends", "--peer", "--json", "--chart"):
        assert flag in result.stdout


def test_dump_then_load_into_an_empty_database(backend: Backend, cli: Cli, tmp_path: Path) -> None:
    _put(cli, backend.url, "a", {"n": 1})
    _put(cli, backend.url, "a", {"n": 2}, "--actor", "svc")
    _put(cli, backend.url, "b", {"s": "\u0000 and 🦄"}, "--namespace", "other", "--tenant", "t")
    target = tmp_path / "dump.jsonl"
    dumped = cli("--url", backend.url, "dump", "--output", str(target))
    assert dumped.status == 0, dumped.err
    assert "dumped 3 versions" in dumped.err
    fresh = backend.fresh_url()
    assert cli("--url", fresh, "migrate").status == 0
    loaded = cli("--url", fresh, "load", "--input", str(target))
    assert loaded.status == 0, loaded.err
    for argv in (("history", "a"), ("history", "b", "--namespace", "other", "--tenant", "t")):
        assert cli("--url", fresh, *argv).json() == cli("--url", backend.url, *argv).json()
    again = cli("--url", fresh, "load", "--input", str(target))
    assert again.status == 2  # the target is no longer empty


def test_export_everywhere_covers_every_namespace_and_tenant(backend: Backend, cli: Cli) -> None:
    for scope in ([], ["--namespace", "cart"], ["--namespace", "cart", "--tenant", "acme"]):
        _put(cli, backend.url, "person", {"in": scope}, *scope)
    everywhere = cli("--url", backend.url, "export", "person", "--everywhere")
    assert everywhere.status == 0, everywhere.err
    header, *lines = [json.loads(line) for line in everywhere.out.splitlines()]
    assert (header["format"], header["user_id"]) == (
        SUBJECT_EXPORT_FORMAT,
        "person",
    )
    scopes = [(line["tenant"], line["namespace"]) for line in lines if "versions" in line]
    assert scopes == [(None, "cart"), (None, "default"), ("acme", "cart")]
    assert len(lines) == 6  # each scope's line and its one version
    one_tenant = cli("--url", backend.url, "export", "person", "--everywhere", "--tenant", "acme")
    assert [json.loads(line).get("namespace") for line in one_tenant.out.splitlines()][1] == "cart"
    assert len(one_tenant.out.splitlines()) == 3
