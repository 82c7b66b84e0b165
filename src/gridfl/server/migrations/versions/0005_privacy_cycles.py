"""differential privacy: the per-cycle privacy ledger

A process hosted with ``server_config.differential_privacy`` records, per cycle, the clip
norm its reports were clipped to and how many fit under it (adaptive clipping), and once
the cycle completes the accountant's steps and epsilon. The process's privacy state (steps
spent, the next clip norm) survives restarts in these rows. Other processes write nothing.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "privacy_cycles",
        sa.Column(
            "cycle_id",
            sa.Integer,
            sa.ForeignKey("cycles.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column(
            "process_id",
            sa.Integer,
            sa.ForeignKey("processes.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("clip_norm", sa.Float, nullable=False),
        sa.Column("unclipped", sa.Integer, nullable=False),
        sa.Column("steps", sa.Integer, nullable=True),
        sa.Column("epsilon", sa.Float, nullable=True),
        sa.Column("epsilon_next", sa.Float, nullable=True),
        sa.Column("next_clip_norm", sa.Float, nullable=True),
    )
    op.create_index("ix_privacy_cycles_steps", "privacy_cycles", ["process_id", "steps"])


def downgrade() -> None:
    op.drop_index("ix_privacy_cycles_steps", table_name="privacy_cycles")
    op.drop_table("privacy_cycles")
