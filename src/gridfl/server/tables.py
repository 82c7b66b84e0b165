"""SQLAlchemy Core tables of the grid node (the migrations create exactly these).

Times are float epoch seconds (UTC), identical on SQLite and PostgreSQL.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

Blob = sa.LargeBinary()

processes = sa.Table(
    "processes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("version", sa.String(255), nullable=False),
    # running | finished | stopped
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("client_config", sa.JSON, nullable=False),
    sa.Column("server_config", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("name", "version", name="uq_process_name_version"),
    sqlite_autoincrement=True,
)

plans = sa.Table(
    "plans",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "process_id", sa.Integer, sa.ForeignKey("processes.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("is_averaging", sa.Boolean, nullable=False, default=False),
    sa.Column("onnx", Blob, nullable=True),
    sa.Column("tfjs", Blob, nullable=True),
    sa.Column("torchscript", Blob, nullable=True),
    sa.Column("list", Blob, nullable=True),
    sa.UniqueConstraint("process_id", "name", "is_averaging", name="uq_plan_name"),
    sqlite_autoincrement=True,
)

protocols = sa.Table(
    "protocols",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "process_id", sa.Integer, sa.ForeignKey("processes.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("data", Blob, nullable=False),
    sa.UniqueConstraint("process_id", "name", name="uq_protocol_name"),
    sqlite_autoincrement=True,
)

checkpoints = sa.Table(
    "checkpoints",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "process_id", sa.Integer, sa.ForeignKey("processes.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("number", sa.Integer, nullable=False),
    # no longer written (migration 0002): "latest" is the highest number. Moving the alias
    # from row to row made SQLite rewrite the previous checkpoint's whole model blob.
    sa.Column("alias", sa.String(64), nullable=True),
    sa.Column("data", Blob, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("process_id", "number", name="uq_checkpoint_number"),
    # the status lists checkpoints from this index alone: in SQLite, reading created_at
    # from the row would walk the model blob stored before it (migration 0002)
    sa.Index("ix_checkpoints_listing", "process_id", "number", "created_at"),
    sqlite_autoincrement=True,
)

cycles = sa.Table(
    "cycles",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "process_id", sa.Integer, sa.ForeignKey("processes.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("sequence", sa.Integer, nullable=False),
    sa.Column("checkpoint_id", sa.Integer, sa.ForeignKey("checkpoints.id"), nullable=False),
    sa.Column("start_at", sa.Float, nullable=False),
    sa.Column("end_at", sa.Float, nullable=True),
    # open | completed | expired | stopped
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("closed_at", sa.Float, nullable=True),
    sa.Column("result_checkpoint_id", sa.Integer, nullable=True),
    sa.Column("num_reports", sa.Integer, nullable=False, default=0),
    # cycle requests this cycle turned away (speed, reuse, full): the dashboard's table
    sa.Column("num_rejected", sa.Integer, nullable=False, default=0, server_default="0"),
    # durability "cycle": when the cycle became ready and began collecting the server
    # processes' partial sums (cycle_partials); its end_at is then the time they must be in
    sa.Column("closing_at", sa.Float, nullable=True),
    sa.UniqueConstraint("process_id", "sequence", name="uq_cycle_sequence"),
    sa.Index("ix_cycles_status_end", "status", "end_at"),
    sqlite_autoincrement=True,
)

workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column(
        "process_id", sa.Integer, sa.ForeignKey("processes.id", ondelete="CASCADE"), nullable=False
    ),
    # who the worker is for the reuse rule: its id, or "sub:<jwt sub>" when the token had one
    sa.Column("identity", sa.String(320), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("ping", sa.Float, nullable=True),
    sa.Column("download", sa.Float, nullable=True),
    sa.Column("upload", sa.Float, nullable=True),
    sa.Index("ix_workers_identity", "process_id", "identity"),
)

worker_cycles = sa.Table(
    "worker_cycles",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "cycle_id", sa.Integer, sa.ForeignKey("cycles.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column(
        "worker_id", sa.String(64), sa.ForeignKey("workers.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("identity", sa.String(320), nullable=False),
    sa.Column("request_key", sa.String(128), nullable=False),
    sa.Column("accepted_at", sa.Float, nullable=False),
    sa.Column("reported_at", sa.Float, nullable=True),
    sa.Column("num_samples", sa.BigInteger, nullable=True),  # up to 2**53 - 1
    sa.Column("metrics", sa.JSON, nullable=True),
    sa.UniqueConstraint("cycle_id", "worker_id", name="uq_worker_cycle"),
    sa.Index("ix_worker_cycles_worker", "worker_id"),
    sa.Index("ix_worker_cycles_identity", "identity"),
)

# Running aggregate of one cycle, folded in as reports arrive (memory and storage O(model)).
# sum_w: sum of num_samples * diff over reports that carried num_samples (count_w reports,
# weight = total num_samples); sum_x: sum of diffs over reports without it (count_x).
# Sums are float32 for an all-float32 model, else float64 (aggregate.ModelSpec.acc_dtype).
# With an iterative averaging plan, sum_x holds the running plan average instead.
aggregates = sa.Table(
    "aggregates",
    metadata,
    sa.Column(
        "cycle_id", sa.Integer, sa.ForeignKey("cycles.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("version", sa.Integer, nullable=False, default=0),
    sa.Column("count_w", sa.Integer, nullable=False, default=0),
    sa.Column("count_x", sa.Integer, nullable=False, default=0),
    sa.Column("weight", sa.Float, nullable=False, default=0.0),
    sa.Column("sum_w", Blob, nullable=True),
    sa.Column("sum_x", Blob, nullable=True),
)

# Durability "cycle" (docs/scaling.md): the reports one server process (``instance_id``,
# GridNode.instance_id) folded into its in-memory partial sums of an open cycle. A report's
# transaction counts itself in ``num_reports``; when the cycle closes, the process writes
# its sums (the columns of ``aggregates``) once and sets ``written_at``.
cycle_partials = sa.Table(
    "cycle_partials",
    metadata,
    sa.Column(
        "cycle_id", sa.Integer, sa.ForeignKey("cycles.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("instance_id", sa.String(32), primary_key=True),
    sa.Column("num_reports", sa.Integer, nullable=False),
    sa.Column("written_at", sa.Float, nullable=True),
    sa.Column("count_w", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("count_x", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("weight", sa.Float, nullable=False, default=0.0, server_default="0"),
    sa.Column("sum_w", Blob, nullable=True),
    sa.Column("sum_x", Blob, nullable=True),
)

# A server optimizer's state after the cycle that produced ``checkpoint_id`` (written in the
# same transaction as that checkpoint): the cycle trained on a checkpoint resumes from its
# row. ``data`` is the float64 vectors ``layout`` names (with their sizes), concatenated;
# ``layout`` also holds the state's JSON scalars (aggregate.StrategyState).
strategy_states = sa.Table(
    "strategy_states",
    metadata,
    sa.Column(
        "checkpoint_id",
        sa.Integer,
        sa.ForeignKey("checkpoints.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column(
        "process_id", sa.Integer, sa.ForeignKey("processes.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("step", sa.Integer, nullable=False),
    # Strategy.describe(state), for the status: read without the model-sized blob (in
    # SQLite a column after the blob would walk its overflow pages)
    sa.Column("summary", sa.JSON, nullable=False),
    sa.Column("layout", sa.JSON, nullable=False),
    sa.Column("data", Blob, nullable=False),
    sa.Index("ix_strategy_states_process", "process_id", "checkpoint_id"),
)

# Every diff of an open cycle whose strategy needs them all (median, Krum...): one row per
# report, flat, in the sums' dtype; dropped with the cycle's aggregate when it closes.
cycle_diffs = sa.Table(
    "cycle_diffs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "cycle_id", sa.Integer, sa.ForeignKey("cycles.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("data", Blob, nullable=False),
    sa.Index("ix_cycle_diffs_cycle", "cycle_id"),
    sqlite_autoincrement=True,
)

# Differential privacy (docs/privacy.md), one row per cycle of a process hosted with
# server_config.differential_privacy: the clip norm the cycle's reports were clipped to and
# how many fit under it (adaptive clipping), written as reports arrive; at completion the
# accountant's steps, epsilon after the cycle and after one more (the budget check before
# the next cycle opens), and the next cycle's clip norm. A process's privacy state is its
# completed row with the most steps.
privacy_cycles = sa.Table(
    "privacy_cycles",
    metadata,
    sa.Column(
        "cycle_id", sa.Integer, sa.ForeignKey("cycles.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column(
        "process_id", sa.Integer, sa.ForeignKey("processes.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("clip_norm", sa.Float, nullable=False),
    sa.Column("unclipped", sa.Integer, nullable=False, default=0),
    sa.Column("steps", sa.Integer, nullable=True),
    sa.Column("epsilon", sa.Float, nullable=True),  # null: infinite (z = 0)
    sa.Column("epsilon_next", sa.Float, nullable=True),
    sa.Column("next_clip_norm", sa.Float, nullable=True),
    sa.Index("ix_privacy_cycles_steps", "process_id", "steps"),
)

#: a secure-aggregation cycle's protocol state: its stage, and in ``state`` what the node
#: decided at the stage closes (neighbour graph, unmask requests; the reason once aborted).
#: The workers' messages are rows of secagg_messages, the masked sum in secagg_totals.
secagg_rounds = sa.Table(
    "secagg_rounds",
    metadata,
    sa.Column(
        "cycle_id", sa.Integer, sa.ForeignKey("cycles.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("stage", sa.String(32), nullable=False),
    # when the current stage opened; when the first worker advertised its keys
    sa.Column("stage_at", sa.Float, nullable=False),
    sa.Column("first_at", sa.Float, nullable=False),
    sa.Column("state", sa.JSON, nullable=False),
    # when the open stage times out (None when none is pending): the deadline timer's key
    sa.Column("due_at", sa.Float, nullable=True),
    # +1 on every write: a server process reuses its in-memory round while it matches
    sa.Column("version", sa.Integer, nullable=False, server_default="0"),
    sa.Index("ix_secagg_rounds_due_at", "due_at"),
)

#: one worker's message at one stage of a secure-aggregation round (public keys, sealed
#: shares, a masked input's arrival, unmask shares; never a diff): a message writes only
#: itself, not the whole round
secagg_messages = sa.Table(
    "secagg_messages",
    metadata,
    sa.Column(
        "cycle_id", sa.Integer, sa.ForeignKey("cycles.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("stage", sa.String(32), primary_key=True),
    sa.Column("worker_id", sa.String(64), primary_key=True),
    sa.Column("body", sa.JSON, nullable=False),
)

#: the masked running sum of a secure-aggregation round (8 bytes per parameter), apart
#: from the round's small state so that writing that state does not rewrite the sum
secagg_totals = sa.Table(
    "secagg_totals",
    metadata,
    sa.Column(
        "cycle_id", sa.Integer, sa.ForeignKey("cycles.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("total", Blob, nullable=False),
)

# Federated evaluation (server_config.evaluation): one row per evaluated checkpoint, opened
# when the first worker is placed in it; its seats hold each worker's metrics, which the
# status averages weighted by num_samples. Never a diff.
evaluations = sa.Table(
    "evaluations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "process_id", sa.Integer, sa.ForeignKey("processes.id", ondelete="CASCADE"), nullable=False
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

evaluation_seats = sa.Table(
    "evaluation_seats",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "evaluation_id",
        sa.Integer,
        sa.ForeignKey("evaluations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column(
        "worker_id", sa.String(64), sa.ForeignKey("workers.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("request_key", sa.String(128), nullable=False),
    sa.Column("accepted_at", sa.Float, nullable=False),
    sa.Column("reported_at", sa.Float, nullable=True),
    sa.Column("num_samples", sa.BigInteger, nullable=True),  # up to 2**53 - 1
    sa.Column("metrics", sa.JSON, nullable=True),
    sa.UniqueConstraint("evaluation_id", "worker_id", name="uq_evaluation_seat"),
    sa.Index("ix_evaluation_seats_worker", "worker_id"),
)
