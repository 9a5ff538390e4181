"""training runs name their sweep and trial; policies keep their file's bytes

A sweep's trials may train on other hosts (a Ray cluster): the policy file is kept in the
store, so promoting the best trial does not depend on the disk it was written to.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_runs") as batch:
        batch.add_column(sa.Column("sweep", sa.String(200), nullable=True))
        batch.add_column(sa.Column("trial", sa.String(200), nullable=True))
        batch.create_index("ix_training_runs_sweep", ["sweep"], unique=False)
    with op.batch_alter_table("policies") as batch:
        batch.add_column(sa.Column("content", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("policies") as batch:
        batch.drop_column("content")
    with op.batch_alter_table("training_runs") as batch:
        batch.drop_index("ix_training_runs_sweep")
        batch.drop_column("trial")
        batch.drop_column("sweep")
