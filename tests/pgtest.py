"""The test PostgreSQL server, for the postgres store's tests (``schema`` is a fixture)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from required import import_or_skip, skip_unless_required

DSN = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def schema() -> Iterator[str]:
    """A fresh schema name on the test server, dropped after the test."""
    # The postgres extra is optional; the test extra installs it, so CI runs these tests.
    psycopg = import_or_skip("psycopg", "the postgres extra (psycopg) is not installed")
    try:
        admin = psycopg.connect(DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        skip_unless_required(f"PostgreSQL at 127.0.0.1:5432 (database test) unreachable: {exc}")
    name = f"upbus_test_{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        admin.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'.encode())
        admin.close()
