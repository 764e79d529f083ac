"""codes, passes, gifts and refunds

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 14:35:24.082497
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "code_batch",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=True),
        sa.Column("issue_number", sa.Integer(), nullable=True),
        sa.Column("pass_id", sa.String(length=32), nullable=True),
        sa.Column("pass_days", sa.Integer(), nullable=True),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("giver", sa.String(length=64), nullable=True),
        sa.Column("gift_entry_id", sa.Integer(), nullable=True),
        sa.Column("created_by", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("code_batch", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_code_batch_giver"), ["giver"], unique=False)

    op.create_table(
        "code_failure",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("openid", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("code_failure", schema=None) as batch_op:
        batch_op.create_index("ix_code_failure_openid_at", ["openid", "at"], unique=False)

    op.create_table(
        "code_freeze",
        sa.Column("openid", sa.String(length=64), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("openid"),
    )
    op.create_table(
        "code_redemption",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code_id", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("openid", sa.String(length=64), nullable=False),
        sa.Column("ledger_entry_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("code_id", "openid", name="uq_code_redemption"),
    )
    with op.batch_alter_table("code_redemption", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_code_redemption_batch_id"), ["batch_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_code_redemption_code_id"), ["code_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_code_redemption_openid"), ["openid"], unique=False)

    op.create_table(
        "pass_period",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("openid", sa.String(length=64), nullable=False),
        sa.Column("pass_id", sa.String(length=32), nullable=False),
        sa.Column("days", sa.Integer(), nullable=False),
        sa.Column("starts_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ends_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("first_issue", sa.Integer(), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("ledger_entry_id", sa.Integer(), nullable=True),
        sa.Column("code_redemption_id", sa.Integer(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=128), nullable=False),
        sa.Column("operator", sa.String(length=64), nullable=True),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("cut_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("refund_entry_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("idempotency_key"),
    )
    with op.batch_alter_table("pass_period", schema=None) as batch_op:
        batch_op.create_index("ix_pass_period_openid_ends", ["openid", "ends_at"], unique=False)

    op.create_table(
        "redemption_code",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("used", sa.Integer(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("used >= 0 AND used <= uses", name="ck_code_uses"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("digest"),
    )
    with op.batch_alter_table("redemption_code", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_redemption_code_batch_id"), ["batch_id"], unique=False)

    with op.batch_alter_table("entitlement", schema=None) as batch_op:
        batch_op.add_column(sa.Column("code_redemption_id", sa.Integer(), nullable=True))

    with op.batch_alter_table("ledger_entry", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pass_id", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("code_batch_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("refers_to", sa.Integer(), nullable=True))




def downgrade() -> None:

    with op.batch_alter_table("ledger_entry", schema=None) as batch_op:
        batch_op.drop_column("refers_to")
        batch_op.drop_column("code_batch_id")
        batch_op.drop_column("pass_id")

    with op.batch_alter_table("entitlement", schema=None) as batch_op:
        batch_op.drop_column("code_redemption_id")

    with op.batch_alter_table("redemption_code", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_redemption_code_batch_id"))

    op.drop_table("redemption_code")
    with op.batch_alter_table("pass_period", schema=None) as batch_op:
        batch_op.drop_index("ix_pass_period_openid_ends")

    op.drop_table("pass_period")
    with op.batch_alter_table("code_redemption", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_code_redemption_openid"))
        batch_op.drop_index(batch_op.f("ix_code_redemption_code_id"))
        batch_op.drop_index(batch_op.f("ix_code_redemption_batch_id"))

    op.drop_table("code_redemption")
    op.drop_table("code_freeze")
    with op.batch_alter_table("code_failure", schema=None) as batch_op:
        batch_op.drop_index("ix_code_failure_openid_at")

    op.drop_table("code_failure")
    with op.batch_alter_table("code_batch", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_code_batch_giver"))

    op.drop_table("code_batch")

