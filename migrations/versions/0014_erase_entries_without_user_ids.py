"""Postgres: an erasure's feed entry and NOTIFY no longer carry the erased user's id.

Until now `snapshot_repo_erase` recorded the erasure in `snapshot_changes`
under the user id, in clear, so the id outlived the erasure in the table,
its indexes and the relation files after VACUUM. The entry (and the NOTIFY
that announces it) now names the erasure receipt's subject, the HMAC of the
id under the application's `erasure_key`, or no one ("") without a key. The
signature is unchanged: only the body is replaced. SQLite and MariaDB/MySQL
write the entry from the library (`Erasure.feed_subject`).

Entries written before this revision keep the id: `snapshot-repo` does not
rewrite them, since it cannot tell which subject they should get; an
operator who must can `DELETE FROM snapshot_changes WHERE kind = 'erase'`
once every consumer has read past them.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import context, op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CREATE = """
CREATE OR REPLACE FUNCTION snapshot_repo_erase(
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
        IF p_drop_data_key AND NOT p_only_expired THEN
            -- A key without a latest row (an older release's failed write) is
            -- still personal data. Lock it first: a writer holding it share-locked
            -- has written its latest row, which the next statement's snapshot
            -- (taken once the lock is ours) then sees, and keeps the key for.
            PERFORM 1 FROM snapshot_data_keys
            WHERE tenant = p_tenant AND namespace = p_namespace AND user_id = p_user_id
            FOR UPDATE;
            DELETE FROM snapshot_data_keys k
            WHERE k.tenant = p_tenant AND k.namespace = p_namespace AND k.user_id = p_user_id
              AND NOT EXISTS (
                SELECT 1 FROM snapshot_latest l
                WHERE l.tenant = p_tenant AND l.namespace = p_namespace
                  AND l.user_id = p_user_id);
        END IF;
        RETURN;
    END IF;
    -- Each statement from here sees every write committed before the lock.
    DELETE FROM snapshot_history
    WHERE tenant = p_tenant AND namespace = p_namespace AND user_id = p_user_id
      AND version <= erased_version;
    GET DIAGNOSTICS erased = ROW_COUNT;
    DELETE FROM snapshot_changes
    WHERE tenant = p_tenant AND namespace = p_namespace AND user_id = p_user_id;
    -- The erase entry names the receipt's subject (an HMAC), or no one: never the id.
    INSERT INTO snapshot_changes (tenant, namespace, user_id, version, created_at, kind, txid)
    VALUES (p_tenant, p_namespace, COALESCE(p_receipt_subject, ''), erased_version, p_at,
            'erase', CAST(CAST(pg_current_xact_id() AS TEXT) AS BIGINT));
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
            'tenant', p_tenant, 'namespace', p_namespace,
            'user_id', COALESCE(p_receipt_subject, ''),
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
        previous = context.script.get_revision("0012")  # 0012's body, as it froze it
        assert previous is not None
        op.execute(previous.module._CREATE)
