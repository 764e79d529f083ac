"""Alembic migrations for the newsbot schema, run from code by :mod:`storage.schema`."""
