"""A million devices checking in over a simulated day: node load with and without pace steering.

    python -m benchmarks.sim_million [--devices 1000000] [--plot docs/img/pace-steering.png]

A discrete-time simulation (1 s steps, numpy over the devices due in each second) of the
design in docs/scaling.md: one synchronous FL task, devices that check in while eligible,
and the node's answer to each check-in. The two runs differ only in the ``timeout`` a
rejected device is told: today's rule (:func:`gridfl.server.rules.retry_timeout`: come back
at the open cycle's deadline) or pace steering (:func:`gridfl.server.rules.paced_timeout`:
spread the next check-ins over the time the next cycles can use them). Both are the node's
own functions.

Assumptions (stated in docs/scaling.md too):

* **Population:** 1,000,000 devices in one time zone (the worst case for bursts). A device
  becomes eligible (idle, charging, unmetered) at a time drawn 75% from Normal(22:00, 1.5 h)
  and 25% uniformly over the day, stays eligible 2 to 8 hours (uniform), and checks in
  when it becomes eligible and whenever its ``timeout`` runs out while it still is.
* **A round** selects 1,300 devices (a goal of 1,000 reports with 30% over-selection),
  each trains for a log-normal time (median 2 minutes, sigma 0.5), and 10% drop out; a
  device that loses eligibility before it finishes drops out too. The round completes at
  1,000 reports, or at its 15-minute deadline with at least 800 (else it fails), and the
  next round opens one second later. A device takes part at most once a day.
* **Pace steering** is what ``gridfl serve`` does with ``pace_steering: {"window": 60}``:
  the check-in rate is averaged over 60 s (:class:`gridfl.server.pacing.CheckInRate`'s
  estimator, per second instead of per check-in), the needed rate is 1,300 per 60 s
  window, and the comebacks are spread after the round's deadline.
* A check-in is one request to the node; "connected" counts the check-ins of the second
  plus the devices training (holding a connection until they report or drop).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gridfl.server.pacing import RATE_TAU
from gridfl.server.rules import paced_timeout, retry_timeout

DAY = 86_400
GOAL = 1_000
SELECT = 1_300  # 30% over-selection
MIN_REPORTS = 800
ROUND_DEADLINE = 900.0
DROPOUT = 0.10
TRAIN_MEDIAN, TRAIN_SIGMA = 120.0, 0.5
SELECTION_WINDOW = 60.0


@dataclass
class Run:
    """What one simulated day measured."""

    checkins: np.ndarray  # check-ins per second
    connected: np.ndarray  # check-ins + devices training, per second
    rounds: list[tuple[float, float, bool]] = field(default_factory=list)  # start, end, ok
    seconds: float = 0.0

    @property
    def completed(self) -> int:
        return sum(ok for _, _, ok in self.rounds)


def population(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(eligible from, eligible until) in whole seconds of the day, per device."""
    evening = rng.random(n) < 0.75
    start = np.where(
        evening, rng.normal(22 * 3600, 1.5 * 3600, n), rng.uniform(0, DAY, n)
    ) % DAY
    until = np.minimum(start + rng.uniform(2 * 3600, 8 * 3600, n), DAY)
    return start.astype(np.int64), until.astype(np.int64)


class Calendar:
    """Device ids due at each second of the day (beyond the day: dropped)."""

    def __init__(self) -> None:
        self.due: list[list[np.ndarray]] = [[] for _ in range(DAY)]

    def add(self, ids: np.ndarray, at: np.ndarray) -> None:
        keep = at < DAY
        ids, at = ids[keep], at[keep]
        if not len(ids):
            return
        if (at == at[0]).all():  # today's rule: everyone at one deadline
            self.due[int(at[0])].append(ids)
            return
        order = np.argsort(at, kind="stable")
        ids, at = ids[order], at[order]
        cuts = np.flatnonzero(np.diff(at)) + 1
        for chunk, t in zip(np.split(ids, cuts), at[np.r_[0, cuts]], strict=True):
            self.due[int(t)].append(chunk)

    def take(self, t: int) -> np.ndarray:
        chunks, self.due[t] = self.due[t], []
        if not chunks:
            return np.empty(0, dtype=np.int64)
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def simulate(n: int, paced: bool, seed: int = 0) -> Run:
    rng = np.random.default_rng(seed)
    start, until = population(n, rng)
    draw = np.random.default_rng(seed + 1)  # the node's own draws, apart from the world's
    calendar = Calendar()
    calendar.add(np.arange(n, dtype=np.int64), start)
    done = np.zeros(n, dtype=bool)
    run = Run(np.zeros(DAY, dtype=np.int64), np.zeros(DAY, dtype=np.int64))
    decay = math.exp(-1.0 / RATE_TAU)
    rate = 0.0
    opened, accepted = 0.0, 0
    reports = np.empty(0)  # this round's report times, sorted
    training_ends = np.empty(0)  # when this round's devices stop training (report or drop)
    started = time.perf_counter()
    for t in range(DAY):
        ids = calendar.take(t)
        if len(ids):
            ids = ids[~done[ids] & (until[ids] > t)]
        run.checkins[t] = len(ids)
        rate = rate * decay + len(ids) / RATE_TAU
        if accepted < SELECT and len(ids):
            ids = ids[draw.permutation(len(ids))]
            take = ids[: SELECT - accepted]
            ids = ids[SELECT - accepted :]
            accepted += len(take)
            done[take] = True
            ends = t + rng.lognormal(math.log(TRAIN_MEDIAN), TRAIN_SIGMA, len(take))
            reported = (rng.random(len(take)) >= DROPOUT) & (ends < until[take])
            reports = np.sort(np.r_[reports, ends[reported]])
            training_ends = np.r_[training_ends, np.minimum(ends, until[take])]
        if len(ids):  # rejected: told when to come back
            wait = retry_timeout(opened + ROUND_DEADLINE, t, 60)
            if paced:
                needed = SELECT / SELECTION_WINDOW
                back = np.array([
                    paced_timeout(wait, SELECTION_WINDOW, rate, needed, d)
                    for d in draw.random(len(ids))
                ])
            else:
                back = np.full(len(ids), wait)
            calendar.add(ids, t + np.maximum(back, 1))
        run.connected[t] = run.checkins[t] + int((training_ends > t).sum())
        got = int(np.searchsorted(reports, t, side="right"))
        if got >= GOAL or t >= opened + ROUND_DEADLINE:
            ok = got >= MIN_REPORTS
            run.rounds.append((opened, float(t), ok))
            opened, accepted = t + 1.0, 0
            reports, training_ends = np.empty(0), training_ends[training_ends > t]
    run.seconds = time.perf_counter() - started
    return run


def summary(name: str, run: Run) -> str:
    per_min = run.checkins[: DAY // 60 * 60].reshape(-1, 60).sum(axis=1)
    ok = [end - start for start, end, good in run.rounds if good]
    return (
        f"{name:<14} {run.checkins.max():>9,} {np.percentile(run.checkins, 99.9):>10,.0f} "
        f"{per_min.max():>11,} {run.checkins.sum():>12,} {run.connected.max():>9,} "
        f"{run.completed:>7} {len(run.rounds) - run.completed:>6} "
        f"{np.median(ok) / 60 if ok else float('nan'):>9.1f} {run.seconds:>6.0f}"
    )


def plot(runs: dict[str, Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (load, rounds) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    hours = np.arange(DAY // 60) / 60
    for name, run in runs.items():
        peak = run.checkins[: DAY // 60 * 60].reshape(-1, 60).max(axis=1)
        load.plot(hours, peak, label=name, linewidth=0.9)
        ends = [end / 3600 for _, end, ok in run.rounds if ok]
        rounds.step(ends, np.arange(1, len(ends) + 1), where="post", label=name)
    load.set_yscale("log")
    load.set_ylabel("node check-ins per second\n(peak of each minute)")
    load.set_title("1,000,000 devices over a day: one FL task, rounds of 1,000 reports")
    load.legend()
    rounds.set_ylabel("rounds completed")
    rounds.set_xlabel("hour of the day")
    rounds.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=None, help="write the figure here")
    args = parser.parse_args(argv)
    runs = {}
    for name, paced in (("today's rule", False), ("pace steering", True)):
        print(f"simulating {args.devices:,} devices for a day: {name}...", flush=True)
        runs[name] = simulate(args.devices, paced, args.seed)
    print(
        f"\n{'':<14} {'peak/s':>9} {'p99.9/s':>10} {'peak/min':>11} {'check-ins':>12} "
        f"{'peak conn':>9} {'rounds':>7} {'failed':>6} {'med min':>9} {'sim s':>6}"
    )
    for name, run in runs.items():
        print(summary(name, run))
    base, paced = runs["today's rule"], runs["pace steering"]
    print(
        f"\npace steering: peak check-ins/s x{paced.checkins.max() / base.checkins.max():.3f}, "
        f"check-ins per day x{paced.checkins.sum() / base.checkins.sum():.3f}, "
        f"peak connected x{paced.connected.max() / base.connected.max():.3f}, "
        f"rounds completed {paced.completed} vs {base.completed}"
    )
    if args.plot:
        plot(runs, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main(sys.argv[1:])
