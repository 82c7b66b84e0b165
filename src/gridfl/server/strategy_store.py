"""The database side of aggregation strategies: a server optimizer's state, stored beside
the checkpoint it produced, and the diffs kept for strategies that need every one of a
cycle. Called by :mod:`gridfl.server.cycles` inside its cycle-locked transactions."""

from __future__ import annotations

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gridfl.server import aggregate as agg
from gridfl.server.tables import cycle_diffs, strategy_states

_state_columns = (strategy_states.c.step, strategy_states.c.layout, strategy_states.c.data)


def keep_diff(conn: Connection, cycle_id: int, flat: np.ndarray) -> None:
    """Store one report's (clipped) flat diff for the cycle."""
    conn.execute(cycle_diffs.insert().values(cycle_id=cycle_id, data=flat.data.cast("B")))


def kept_diffs(conn: Connection, cycle_id: int, spec: agg.ModelSpec) -> np.ndarray:
    """Every diff kept for the cycle, in report order, as one float64 (n, params) matrix:
    the memory bound of a robust strategy, max_diffs x params x 8 bytes."""
    rows = conn.execute(
        sa.select(cycle_diffs.c.data)
        .where(cycle_diffs.c.cycle_id == cycle_id)
        .order_by(cycle_diffs.c.id)
    ).scalars()
    blobs = list(rows)
    out = np.empty((len(blobs), spec.total))
    for i, blob in enumerate(blobs):
        out[i] = np.frombuffer(blob, dtype=spec.acc_dtype)
    return out


def save_state(
    conn: Connection, checkpoint_id: int, process_id: int, state: agg.StrategyState, summary
) -> None:
    """Persist the state that goes with a new checkpoint (same transaction as its row),
    with its JSON ``summary`` for the status, and drop the process's older states: cycles
    only ever open on the newest checkpoint, so one row per process is all that is read
    (and the one the new row replaces goes in the same commit: never none, never two)."""
    step, layout, data = state.encode()
    conn.execute(
        strategy_states.delete().where(
            strategy_states.c.process_id == process_id,
            strategy_states.c.checkpoint_id != checkpoint_id,
        )
    )
    conn.execute(
        strategy_states.insert().values(
            checkpoint_id=checkpoint_id,
            process_id=process_id,
            step=step,
            summary=summary,
            layout=layout,
            data=data,
        )
    )


def load_state(conn: Connection, checkpoint_id: int) -> agg.StrategyState | None:
    """The state written with this checkpoint; ``None`` for the hosted one (no step yet)."""
    row = conn.execute(
        sa.select(*_state_columns).where(strategy_states.c.checkpoint_id == checkpoint_id)
    ).first()
    return None if row is None else agg.StrategyState.decode(row.step, row.layout, bytes(row.data))


def latest_summary(conn: Connection, process_id: int) -> dict | None:
    """The summary stored with the process's newest state (no blob read), or ``None``."""
    return conn.execute(
        sa.select(strategy_states.c.summary)
        .where(strategy_states.c.process_id == process_id)
        .order_by(strategy_states.c.checkpoint_id.desc())
        .limit(1)
    ).scalar()
