"""tenant limits, artifact retention, blob locks

Per-tenant overrides of the rate limit and quotas (NULL: the settings' default), ``jobs.artifacts_expired``
for the retention pass, and ``blobs``: the row writers and the blob collector lock so that a blob is
never removed while a row that needs it is being recorded (``service/blob_gc.py``).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rate_limit_rps", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("rate_limit_burst", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_active_jobs", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_storage_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("artifacts_expired", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("held_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("sha256"),
    )


def downgrade() -> None:
    op.drop_table("blobs")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("artifacts_expired")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("max_storage_bytes")
        batch_op.drop_column("max_active_jobs")
        batch_op.drop_column("rate_limit_burst")
        batch_op.drop_column("rate_limit_rps")
