"""Revision scripts, oldest first by number; Alembic links them through ``down_revision``."""
