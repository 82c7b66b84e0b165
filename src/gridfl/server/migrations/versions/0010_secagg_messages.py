"""secure aggregation: one row per worker message (secagg_messages), so that a message
writes only itself instead of rewriting the whole round's state (O(n s) bytes) each time;
the round's ``state`` keeps what the node decided at the stage closes

Revision ID: 0010
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0008"
branch_labels = None
depends_on = None

LIVE = ("advertise_keys", "share_keys", "masked_input", "unmask")
_rounds = sa.table(
    "secagg_rounds",
    sa.column("cycle_id", sa.Integer),
    sa.column("stage", sa.String),
    sa.column("state", sa.JSON),
)
_messages = sa.table(
    "secagg_messages",
    sa.column("cycle_id", sa.Integer),
    sa.column("stage", sa.String),
    sa.column("worker_id", sa.String),
    sa.column("body", sa.JSON),
)


def upgrade() -> None:
    op.create_table(
        "secagg_messages",
        sa.Column(
            "cycle_id",
            sa.Integer,
            sa.ForeignKey("cycles.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("stage", sa.String(32), primary_key=True),
        sa.Column("worker_id", sa.String(64), primary_key=True),
        sa.Column("body", sa.JSON, nullable=False),
    )
    conn = op.get_bind()
    for row in conn.execute(sa.select(_rounds).where(_rounds.c.stage.in_(LIVE))).all():
        old = row.state
        rows = (
            [("advertise_keys", u, k) for u, k in old["keys"].items()]
            + [("share_keys", u, {"shares": s}) for u, s in old["shared"].items()]
            + [("masked_input", u, {}) for u in old["masked"]]
            + [("unmask", u, a) for u, a in old["answers"].items()]
        )
        if rows:
            conn.execute(
                _messages.insert(),
                [{"cycle_id": row.cycle_id, "stage": s, "worker_id": u, "body": b}
                 for s, u, b in rows],
            )
        new = {"graph": old["graph"], "requests": old["requests"]}
        conn.execute(
            _rounds.update().where(_rounds.c.cycle_id == row.cycle_id).values(state=new)
        )


def downgrade() -> None:
    conn = op.get_bind()
    for row in conn.execute(sa.select(_rounds).where(_rounds.c.stage.in_(LIVE))).all():
        got: dict[str, dict] = {s: {} for s in LIVE}
        where = _messages.c.cycle_id == row.cycle_id
        for m in conn.execute(sa.select(_messages).where(where)).all():
            got[m.stage][m.worker_id] = m.body
        old = {
            "stage": row.stage,
            "keys": got["advertise_keys"],
            "graph": row.state["graph"],
            "shared": {u: b["shares"] for u, b in got["share_keys"].items()},
            "masked": sorted(got["masked_input"]),
            "requests": row.state["requests"],
            "answers": got["unmask"],
        }
        conn.execute(
            _rounds.update().where(_rounds.c.cycle_id == row.cycle_id).values(state=old)
        )
    op.drop_table("secagg_messages")
