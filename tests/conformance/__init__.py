"""The conformance suite: the `Backend` contract, written once, run on every target.

Each test takes the `make_repo` factory (or `repo`, one repository made by
it) and runs on the four targets of `tests.support.conformance.TARGETS`:
the fast SQLite and Postgres backends, and the core backend on each
database, the reference the fast backends are tested against. Modules group
the tests by capability.
"""
