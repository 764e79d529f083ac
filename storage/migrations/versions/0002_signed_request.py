"""signed_request: (timestamp, nonce) pairs seen, for replay protection

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 11:42:19.853251
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Starts empty: pairs accepted in the freshness window before the upgrade are not in it
    # (docs/deploy.md, "Safe mode", says what that means for a restart).
    op.create_table(
        "signed_request",
        sa.Column("timestamp", sa.BigInteger(), nullable=False),
        sa.Column("nonce", sa.String(length=128), nullable=False),
        sa.Column("body_sha256", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("timestamp", "nonce"),
    )


def downgrade() -> None:
    op.drop_table("signed_request")
