"""The `backend` repository option that picks a target's backend (checked once, no database)."""

from __future__ import annotations

from pathlib import Path

import pytest

import snapshot_repo as sr
from snapshot_repo.backends.core import CoreBackend


@pytest.mark.parametrize("bad", ["fast", "CORE", None, 1])
def test_an_unknown_backend_is_refused_naming_the_option(tmp_path: Path, bad: object):
    with pytest.raises(sr.ConfigurationError, match="backend"):
        sr.SnapshotRepository.from_url(f"sqlite:///{tmp_path / 'x.db'}", backend=bad)  # type: ignore[arg-type]


async def test_core_is_chosen_without_connecting(tmp_path: Path):
    path = tmp_path / "never.db"
    repo = sr.SnapshotRepository.from_url(f"sqlite:///{path}", backend="core")
    assert isinstance(repo._backend, CoreBackend)
    await repo.close()
    assert not path.exists()
