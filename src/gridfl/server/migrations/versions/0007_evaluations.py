"""federated evaluation: evaluated checkpoints and their workers' metrics

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "process_id",
            sa.Integer,
            sa.ForeignKey("processes.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "checkpoint_id",
            sa.Integer,
            sa.ForeignKey("checkpoints.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("opened_at", sa.Float, nullable=False),
        sa.UniqueConstraint("process_id", "checkpoint_id", name="uq_evaluation_checkpoint"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "evaluation_seats",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "evaluation_id",
            sa.Integer,
            sa.ForeignKey("evaluations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "worker_id",
            sa.String(64),
            sa.ForeignKey("workers.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("request_key", sa.String(128), nullable=False),
        sa.Column("accepted_at", sa.Float, nullable=False),
        sa.Column("reported_at", sa.Float, nullable=True),
        sa.Column("num_samples", sa.BigInteger, nullable=True),
        sa.Column("metrics", sa.JSON, nullable=True),
        sa.UniqueConstraint("evaluation_id", "worker_id", name="uq_evaluation_seat"),
    )
    op.create_index("ix_evaluation_seats_worker", "evaluation_seats", ["worker_id"])


def downgrade() -> None:
    op.drop_index("ix_evaluation_seats_worker", "evaluation_seats")
    op.drop_table("evaluation_seats")
    op.drop_table("evaluations")
