"""Postgres: a whole erasure in one round trip, through a function.

An erasure deletes the latest row first, which waits out and then excludes
every writer of the user, and only then the rest (history up to that
version, the user's feed entries, the data key), so that the rest is read
in a snapshot taken after those writers committed: one CTE has one snapshot
and could leave the history row of a writer it waited for. That took two
statements inside BEGIN ... COMMIT, four round trips. Under READ COMMITTED
each statement of a VOLATILE PL/pgSQL function takes a new snapshot, so
`snapshot_repo_erase` keeps that order in one call, atomic as one
statement. Measured on loopback: 0.23 ms p50 per erasure against 0.49 for
the four round trips (and 0.36 for hand-written SQL doing only latest and
history in four).

The function's body is frozen here, as migrations are: a later change to
what an erasure does is a new revision replacing it. SQLite runs the same
statements in one transaction on the connection's thread; nothing changes
there.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SIGNATURE = (
    "snapshot_repo_erase(text, text, text, timestamptz, boolean, text, text, boolean, boolean)"
)

_CREATE = """
CREATE FUNCTION snapshot_repo_erase(
    p_tenant text, p_namespace text, p_user_id text, p_at timestamptz,
    p_only_expired boolean, p_receipt_subject text, p_cause text,
    p_drop_data_key boolean, p_notify boolean,
    OUT erased bigint, OUT erased_version bigint
) LANGUAGE plpgsql VOLATILE AS $erase$
BEGIN
    -- First, alone: waits out and then excludes every writer of the user.
    DELETE FROM snapshot_latest
    WHERE tenant = p_tenant AND namespace = p_namespace AND user_id = p_user_id
      AND (NOT p_only_expired OR expires_at <= p_at)  -- reaping: expired by then
    RETURNING version INTO erased_version;
    IF NOT FOUND THEN
        erased := 0;
        erased_version := 0;
        RETURN;
    END IF;
    -- Each statement from here sees every write committed before the lock.
    DELETE FROM snapshot_history
    WHERE tenant = p_tenant AND namespace = p_namespace AND user_id = p_user_id
      AND version <= erased_version;
    GET DIAGNOSTICS erased = ROW_COUNT;
    DELETE FROM snapshot_changes
    WHERE tenant = p_tenant AND namespace = p_namespace AND user_id = p_user_id;
    INSERT INTO snapshot_changes (tenant, namespace, user_id, version, created_at, kind, txid)
    VALUES (p_tenant, p_namespace, p_user_id, erased_version, p_at, 'erase',
            CAST(CAST(pg_current_xact_id() AS TEXT) AS BIGINT));
    IF p_receipt_subject IS NOT NULL THEN
        INSERT INTO snapshot_erasure_receipts
            (subject, tenant, namespace, erased_at, versions_erased, cause)
        VALUES (p_receipt_subject, p_tenant, p_namespace, p_at, erased, p_cause);
    END IF;
    IF p_drop_data_key THEN
        DELETE FROM snapshot_data_keys
        WHERE tenant = p_tenant AND namespace = p_namespace AND user_id = p_user_id;
    END IF;
    IF p_notify THEN  -- delivered at commit, as every NOTIFY
        PERFORM pg_notify('snapshot_repo_changes', CAST(json_build_object(
            'tenant', p_tenant, 'namespace', p_namespace, 'user_id', p_user_id,
            'version', erased_version, 'kind', 'erase') AS text));
    END IF;
END
$erase$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_CREATE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION {_SIGNATURE}")
