"""Core constructs for SQL that SQLAlchemy's dialects do not render, each with `@compiles`.

Each construct is an ordinary Core element, so statements using it are
built, cached and executed like any other; only its rendering on a given
dialect is ours (as advanced-alchemy's `operations.py` does for MERGE).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table, TableClause, column
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.visitors import InternalTraversal

__all__ = ["IndexedTable", "indexed_by"]


class IndexedTable(TableClause):
    """A table read through one of its indexes: `<table> INDEXED BY <index>` on SQLite.

    SQLite plans from `sqlite_stat1` as last written, and stale statistics
    can make it scan a whole table where an index bounds the read; SQLAlchemy's
    SQLite dialect renders no index hints. Other dialects render the table plainly.

    The element is a table of the same name with columns of the same names and
    types as the table's, not a wrapper around it: a statement selects from,
    filters on and deletes from this element's own columns, so that it (and
    not the plain table beside it) is the statement's FROM, in SELECT and
    DELETE alike. Build one with `indexed_by`.
    """

    inherit_cache = True
    # The index is part of the statement: two hints must not share a cached compilation.
    _traverse_internals = [  # noqa: RUF012 (declared so by SQLAlchemy, which reads it)
        *TableClause._traverse_internals,
        ("index", InternalTraversal.dp_string),
    ]

    def __init__(self, table: Table, index: str) -> None:
        super().__init__(
            table.name, *(column(c.name, c.type) for c in table.c), schema=table.schema
        )
        self.index = index


def indexed_by(table: Table, index: str) -> IndexedTable:
    """`table`, read through its index named `index` on SQLite (see `IndexedTable`).

    Raises:
        ValueError: `table` declares no index of that name; checked here, when
            the statement is built, rather than by SQLite when it first runs.
    """
    if index not in {declared.name for declared in table.indexes}:
        raise ValueError(f"{table.name} declares no index {index!r}")
    return IndexedTable(table, index)


@compiles(IndexedTable, "sqlite")
def _sqlite_indexed_by(element: IndexedTable, compiler: SQLCompiler, **kw: Any) -> str:
    rendered: str = compiler.visit_table(element, **kw)  # type: ignore[no-untyped-call]
    # The hint belongs where the table is named as a FROM (SELECT or DELETE), not elsewhere.
    if not rendered or not kw.get("asfrom") or kw.get("ashint"):
        return rendered
    return f"{rendered} INDEXED BY {compiler.preparer.quote(element.index)}"
