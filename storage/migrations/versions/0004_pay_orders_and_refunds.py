"""pay orders and refunds

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 15:15:31.392269

Both tables are new, so no server defaults are needed for the rows already there.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "pay_order",
        sa.Column("out_trade_no", sa.String(length=32), nullable=False),
        sa.Column("openid", sa.String(length=64), nullable=False),
        sa.Column("package_id", sa.String(length=32), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False),
        sa.Column("issue_number", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("mch_id", sa.String(length=32), nullable=False),
        sa.Column("app_id", sa.String(length=64), nullable=False),
        sa.Column("description", sa.String(length=127), nullable=False),
        sa.Column("request_json", sa.Text(), nullable=False),
        sa.Column("prepay_id", sa.String(length=64), nullable=True),
        sa.Column("code_url", sa.String(length=256), nullable=True),
        sa.Column("transaction_id", sa.String(length=64), nullable=True),
        sa.Column("payer_openid", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_query_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("credit_entry_id", sa.Integer(), nullable=True),
        sa.Column("unlock_entry_id", sa.Integer(), nullable=True),
        sa.Column("unlock_note", sa.String(length=16), nullable=True),
        sa.Column("refunded_fen", sa.BigInteger(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint("amount_fen > 0 AND tokens > 0", name="ck_pay_order_positive"),
        sa.PrimaryKeyConstraint("out_trade_no"),
    )
    with op.batch_alter_table("pay_order", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_pay_order_openid"), ["openid"], unique=False)
        batch_op.create_index("ix_pay_order_status_created", ["status", "created_at"],
                              unique=False)

    op.create_table(
        "pay_refund",
        sa.Column("out_refund_no", sa.String(length=64), nullable=False),
        sa.Column("out_trade_no", sa.String(length=32), nullable=False),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("debit_entry_id", sa.Integer(), nullable=True),
        sa.Column("reason", sa.String(length=80), nullable=False),
        sa.Column("forced", sa.Boolean(), nullable=False),
        sa.Column("operator", sa.String(length=64), nullable=True),
        sa.Column("refund_id", sa.String(length=64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("amount_fen > 0 AND tokens >= 0", name="ck_pay_refund_amounts"),
        sa.PrimaryKeyConstraint("out_refund_no"),
    )
    with op.batch_alter_table("pay_refund", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_pay_refund_out_trade_no"), ["out_trade_no"],
                              unique=False)



def downgrade() -> None:
    with op.batch_alter_table("pay_refund", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_pay_refund_out_trade_no"))

    op.drop_table("pay_refund")
    with op.batch_alter_table("pay_order", schema=None) as batch_op:
        batch_op.drop_index("ix_pay_order_status_created")
        batch_op.drop_index(batch_op.f("ix_pay_order_openid"))

    op.drop_table("pay_order")
