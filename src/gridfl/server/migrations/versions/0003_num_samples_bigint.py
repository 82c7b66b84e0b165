"""num_samples as a 64-bit integer

A report's ``num_samples`` may be up to 2**53 - 1 (exact in a double, JavaScript's safe
integer), but PostgreSQL's ``integer`` stops at 2**31 - 1, so a larger one failed the
report with a database error. SQLite's integers are 64-bit already: nothing changes there.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("worker_cycles", "num_samples", type_=sa.BigInteger)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # a value above 2**31 - 1 has no place in the old column: refuse, keep the data
        op.alter_column("worker_cycles", "num_samples", type_=sa.Integer)
