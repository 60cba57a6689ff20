"""A throwaway PostgreSQL database on this machine's server, for tests of MLflow on PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy

SERVER_URL = os.environ.get("HPO_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432")


@contextlib.contextmanager
def postgres_database(prefix: str = "hpo_test") -> Iterator[str]:
    """Create a uniquely named database, yield its SQLAlchemy URL, and drop it afterwards.

    Fails the test with the fix when the server at ``HPO_TEST_POSTGRES`` is not reachable.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(f"{SERVER_URL}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except sqlalchemy.exc.OperationalError as err:
        admin.dispose()
        pytest.fail(f"PostgreSQL at {SERVER_URL} is not reachable ({err.orig}); start it or set HPO_TEST_POSTGRES")
    try:
        yield f"{SERVER_URL}/{name}"
    finally:
        # MLflow keeps one engine per URI for the life of the process: close its pool, and
        # force the drop because another connection may still be open (PostgreSQL 13+).
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        cached = getattr(SqlAlchemyStore, "_engine_map", {}).pop(f"{SERVER_URL}/{name}", None)
        if cached is not None:
            cached.dispose()
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
