"""size_bytes as BIGINT

``datasets``, ``models`` and ``artifacts`` recorded file sizes in a 32-bit INTEGER, so on PostgreSQL a
file of 2 GiB or more (a ViT-H checkpoint, or any upload once an operator raises
``VITQ_MAX_UPLOAD_BYTES``) failed to record with an overflow: a 500 after the bytes were stored.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES = ("datasets", "models", "artifacts")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(
                "size_bytes", existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=False
            )


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.alter_column(
                "size_bytes", existing_type=sa.BigInteger(), type_=sa.Integer(), existing_nullable=False
            )
