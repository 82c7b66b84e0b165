"""covering index for listing checkpoints

SQLite keeps a row's columns in order and a checkpoint's ``created_at`` comes after its
model blob, so reading it walked the blob's overflow pages (about 100 pages of 64 KiB
for the McMahan CNN) for every checkpoint the status listed. The status reads
(process_id, number, created_at) from this index alone.

From this revision on the ``alias`` column is no longer written: "latest" is the
highest-numbered checkpoint (moving the alias made SQLite rewrite a whole model blob).
Building the index on SQLite reads every stored checkpoint once (their ``created_at``
sits after the blob), so the first start on a large existing database takes a while.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_checkpoints_listing",
        "checkpoints",
        ["process_id", "number", "created_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_checkpoints_listing", table_name="checkpoints")
    # revision 0001 finds "latest" by its alias: put it back on each process's newest
    op.execute("UPDATE checkpoints SET alias = NULL WHERE alias IS NOT NULL")
    op.execute(
        "UPDATE checkpoints SET alias = 'latest' WHERE number = "
        "(SELECT MAX(c.number) FROM checkpoints c WHERE c.process_id = checkpoints.process_id)"
    )
