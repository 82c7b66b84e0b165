"""One demo worker process: only the worker SDK and numpy, no torch.

It holds several McMahan "clients" (shards of MNIST in one directory, see
:class:`Shard`) and, for every cycle the node accepts it into, trains the training plan on one of
them picked at random, then reports the diff. It ends when the node says there is
nothing left to train.

    python -m gridfl.demo.worker ws://127.0.0.1:5000 mnist-cnn 1 data/shard-0 --seed 0
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gridfl import GridError, state
from gridfl.client import Syft
from gridfl.demo import norms
from gridfl.privacy import l2_norm

#: what a Byzantine demo worker sends instead of its diff (``gridfl demo --attack``)
ATTACKS = ("scale", "signflip", "noise")


def poison(diff: Sequence[np.ndarray], attack: str, rng: np.random.Generator) -> list:
    """A poisoned diff: ``scale`` multiplies it by 100, ``signflip`` negates it, ``noise``
    replaces it with Gaussian noise 100 times its RMS (per tensor).

    >>> d = [np.array([1.0, -2.0], np.float32)]
    >>> poison(d, "scale", np.random.default_rng(0))[0].tolist()
    [100.0, -200.0]
    >>> poison(d, "signflip", np.random.default_rng(0))[0].tolist()
    [-1.0, 2.0]
    """
    if attack == "scale":
        return [a * a.dtype.type(100) for a in diff]
    if attack == "signflip":
        return [-a for a in diff]
    if attack == "noise":
        return [
            rng.normal(scale=100 * float(np.sqrt(np.mean(np.square(a, dtype=np.float64)))) or 1.0,
                       size=a.shape).astype(a.dtype)
            for a in diff
        ]
    raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")


class Shard(Sequence):
    """The (data, target) clients of a shard directory, read from disk when one is picked.

    A worker trains one client per cycle, so it holds one client's 600 examples
    (1.9 MB) instead of all of them (19 MB for 10 MNIST clients). The directory holds
    every client's rows in one ``x.npy`` and one ``y.npy`` with the clients' row bounds
    in ``bounds.npy`` (written by :func:`write_shard`); a pick maps the files and copies
    its rows out, about 0.5 ms of CPU. (An ``.npz`` member took 2-3 ms: zipfile checks the
    CRC of every byte it reads.)

        write_shard("data/shard-0", [(x0, y0), (x1, y1)])
        x, y = Shard("data/shard-0")[1]
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._bounds = np.load(self.path / "bounds.npy")
        self._count = len(self._bounds) - 1

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._count))]
        i = int(i)
        if not -self._count <= i < self._count:
            raise IndexError(f"client {i} out of range (the shard has {self._count})")
        i %= self._count
        lo, hi = int(self._bounds[i]), int(self._bounds[i + 1])
        # copies of the client's rows; the maps close when these lines end
        x = np.array(np.load(self.path / "x.npy", mmap_mode="r")[lo:hi])
        y = np.array(np.load(self.path / "y.npy", mmap_mode="r")[lo:hi])
        return x, y


def write_shard(path: str | os.PathLike, clients: Sequence[tuple[np.ndarray, np.ndarray]]):
    """Write ``clients`` (a ``(data, target)`` pair each, same trailing shapes) as the
    shard directory :class:`Shard` reads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sizes = [len(x) for x, _ in clients]
    if any(len(y) != n for (_, y), n in zip(clients, sizes, strict=True)):
        raise ValueError("each client needs as many targets as examples")
    np.save(path / "x.npy", np.concatenate([x for x, _ in clients]))
    np.save(path / "y.npy", np.concatenate([y for _, y in clients]))
    np.save(path / "bounds.npy", np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


class ComputeSlots:
    """At most N workers of this machine train at once: a FIFO holds one byte per free
    slot (the protocol of GNU make's jobserver). Taking a slot reads a byte, giving it
    back writes one.

    The demo's ten processes stand in for ten devices on two cores. Time-slicing ten
    training processes on two cores evicts each one's caches every few milliseconds: the
    CNN's local epochs ran ~25% slower than the same epochs run two at a time. Flower's
    simulation bounds concurrency by the CPUs in the same way.

        slots = ComputeSlots("/tmp/demo/slots")
        with slots:
            result = job.train(...)
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.fd = None if path is None else os.open(path, os.O_RDWR)

    def __enter__(self) -> ComputeSlots:
        if self.fd is not None:
            os.read(self.fd, 1)  # blocks until a slot is free
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.write(self.fd, b"+")


def run(
    url: str,
    name: str,
    version: str,
    clients,
    *,
    seed: int,
    wait: float,
    slots: ComputeSlots | None = None,
    attack: str | None = None,
    slowdown: float = 1.0,
    evaluate: bool = False,
    norms_log: str | None = None,
) -> int:
    """Join cycles until the node is done; returns the number of cycles reported. With
    ``attack``, every report is poisoned (:func:`poison`). ``slowdown`` > 1 makes a slow
    device: after each training it sleeps ``slowdown - 1`` times the training's time (its
    compute slot given back), so a round takes ``slowdown`` times as long. With
    ``evaluate`` the last 10% of each client's examples are held out of training and the
    worker takes evaluation cycles on them (federated evaluation). With ``norms_log``,
    each report the node takes appends its sending time and diff norm there
    (:mod:`gridfl.demo.norms`: the demo's view of adaptive clipping)."""
    slots = slots or ComputeSlots(None)
    rng = np.random.default_rng(seed)
    reported = 0
    with Syft(url) as client:
        job = client.new_job(name, version)
        job.can_evaluate = evaluate
        outcome: dict = {}

        @job.on("accepted")
        def on_accepted(model, client_config):
            data, target = clients[rng.integers(len(clients))]  # read now: one in memory
            if evaluate:
                held = max(1, len(data) // 10)
                if job.kind == "evaluation":
                    _report_evaluation(job, slots, data[-held:], target[-held:], outcome)
                    return
                data, target = data[:-held], target[:-held]
            with slots:
                started = time.perf_counter()  # the training, not the wait for a slot
                result = job.train("training_plan", data, target, shuffle=True,
                                   seed=int(rng.integers(2**31)))
                trained = time.perf_counter() - started
            if slowdown > 1:
                time.sleep((slowdown - 1) * trained)
            diff = model.create_serialized_diff(result.params)
            if attack is not None:
                diff = state.dumps(poison(state.loads(diff), attack, rng))
            _report_training(job, diff, result, outcome, norms_log)

        @job.on("rejected")
        def on_rejected(timeout):
            outcome["timeout"] = timeout

        @job.on("error")
        def on_error(exc):
            outcome["error"] = exc

        # A round that failed is told only once the node says whether training goes on:
        # when the process stops (the demo reached its target), the rounds in flight fail
        # with "cycle N is closed (stopped)", and that is the normal end, not a failure.
        failed: Exception | None = None
        while True:
            outcome.clear()
            job.start(wait=wait)  # the same job again: the next cycle, same worker id
            nothing_left = (
                "error" not in outcome
                and not outcome.get("reported")
                and not outcome.get("evaluated")
                and outcome.get("timeout") is None
            )
            if nothing_left:
                if failed is not None:
                    logging.info("training ended during the last round (%s)", failed)
                return reported
            if failed is not None:
                logging.warning("cycle failed: %s", failed)
                failed = None
            if "error" in outcome:
                failed = outcome["error"]
                time.sleep(0.5)
            elif outcome.get("reported"):
                reported += 1


def _report_training(job, diff: bytes, result, outcome: dict, norms_log) -> None:
    """Report the diff; with ``norms_log``, log its norm once the node took it."""
    sent_at = time.time()  # before sending: inside the cycle's window on the node
    try:
        job.report(diff, num_samples=result.num_samples,
                   metrics={"loss": result.loss, **result.metrics})
    except GridError as exc:  # e.g. the cycle closed first: a late device's round
        outcome["error"] = exc
        return
    if norms_log is not None:
        norms.record(norms_log, sent_at, l2_norm(state.loads(diff)))
    outcome["reported"] = True


def _report_evaluation(job, slots: ComputeSlots, data, target, outcome: dict) -> None:
    """An evaluation cycle: the evaluation plan on the held-out examples, metrics only."""
    with slots:
        measured = job.evaluate(data, target)
    try:
        job.report_metrics(measured.num_samples, measured.metrics)
    except GridError as exc:  # e.g. the process was stopped
        outcome["error"] = exc
        return
    outcome["evaluated"] = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("name")
    parser.add_argument("version")
    parser.add_argument("shard", help="a shard directory (see Shard)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wait", type=float, default=30.0, help="long-poll seconds")
    parser.add_argument(
        "--wait-for-go",
        action="store_true",
        help="load everything, then wait for a line on stdin before joining",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="lower this process's CPU priority (the node's requests go first)",
    )
    parser.add_argument(
        "--compute-slots",
        metavar="FIFO",
        default=None,
        help="train only while holding a slot of this FIFO (one byte each)",
    )
    parser.add_argument(
        "--attack",
        choices=ATTACKS,
        default=None,
        help="report poisoned diffs (a Byzantine worker, for robust aggregation)",
    )
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="hold out 10%% of each client's examples and take evaluation cycles on them",
    )
    parser.add_argument(
        "--slowdown",
        type=float,
        default=1.0,
        help="a slow device: each round takes this many times its training time",
    )
    parser.add_argument(
        "--norms-log",
        metavar="FILE",
        default=None,
        help="append each report's sending time and diff L2 norm to FILE",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.slowdown <= 100:
        parser.error("--slowdown must be in [1, 100]")
    if args.nice:
        os.nice(args.nice)
    logging.basicConfig(level=logging.WARNING, format="worker %(process)d: %(message)s")
    if args.wait_for_go:
        import onnxruntime  # noqa: F401 - the slow import, done before the start signal

        sys.stdin.readline()  # the demo writes the shards while this process starts
    clients = Shard(args.shard)
    run(
        args.url,
        args.name,
        args.version,
        clients,
        seed=args.seed,
        wait=args.wait,
        slots=ComputeSlots(args.compute_slots),
        attack=args.attack,
        slowdown=args.slowdown,
        evaluate=args.evaluate,
        norms_log=args.norms_log,
    )
    assert "torch" not in sys.modules, "demo workers must not import torch"
    return 0


if __name__ == "__main__":
    sys.exit(main())
