"""Start-up of ``gridfl demo --model 2nn``: from the command to the first checkpoint.

    python -m benchmarks.bench_demo_start [--runs 5] [--baseline NAME=SRC ...]

Runs ``gridfl demo --model 2nn --cycles 1`` as a user would (the console script), in a fresh data
directory and plan cache: once cold (MNIST loaded and dealt into shards, plans compiled
with PyTorch), then ``--runs`` times again, when the shards and the plans are ready.
For each run it prints the seconds from launching the command to the node closing the
first aggregated cycle (``first_checkpoint_at`` in results.json, this machine's clock),
the node's boot, and the CPU seconds each kind of process had used by then (read from
/proc every 50 ms: the demo process, the node, the worker processes with their fork
server). The last lines give the median of the warm runs, cold / warm, and the load
average, since on a shared machine other work stretches every wall time; the CPU
seconds are the part that does not depend on it (their sum over the cores is the least
wall time the start-up can take on an idle machine). A cold run's CPU leaves out its
compiler process, gone before the first checkpoint.

``--baseline NAME=SRC`` runs another gridfl source tree (the ``src`` folder of an
earlier commit, e.g. from ``git archive``, whose demo records ``first_checkpoint_at``)
side by side: the variants take turns, run by run, so the load hits them alike, and the
last lines give each one's median and its ratio to this tree's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _processes() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU seconds, command line) of every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        found[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK,
                                  cmd)
    return found


def _cpu_by_kind(root: int) -> dict[str, float]:
    """CPU seconds of ``root`` and its descendants, by kind of process."""
    procs = _processes()
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, (parent, _, _) in procs.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    kinds: dict[str, float] = {"demo": 0.0, "node": 0.0, "workers": 0.0, "other": 0.0}
    for pid in tree & procs.keys():
        _, cpu, cmd = procs[pid]
        kind = ("demo" if pid == root else "node" if " serve " in cmd
                else "other" if "multiprocessing.spawn" in cmd  # a cold run's compiler
                else "workers" if "multiprocessing" in cmd or "demo.worker" in cmd else "other")
        kinds[kind] += cpu
    return kinds


def run_once(data_dir: Path, out_dir: Path, env: dict[str, str]) -> dict:
    """One ``gridfl demo`` run: seconds to the first checkpoint, boot, CPU by kind."""
    script = Path(sys.executable).with_name("gridfl")  # the command users type
    command = [str(script)] if script.exists() else [sys.executable, "-m", "gridfl"]
    launched = time.time()
    proc = subprocess.Popen(
        [*command, "demo", "--model", "2nn", "--cycles", "1",
         "--data-dir", str(data_dir), "--out-dir", str(out_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )
    samples: list[tuple[float, dict[str, float]]] = []
    while proc.poll() is None:
        samples.append((time.time(), _cpu_by_kind(proc.pid)))
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"gridfl demo failed:\n{proc.stderr.read().decode()[-2000:]}")
    result = json.loads((out_dir / "results.json").read_text())
    at = result["first_checkpoint_at"]
    cpu = next((c for t, c in reversed(samples) if t <= at), samples[0][1])
    return {"seconds": at - launched, "boot": result["node_boot_seconds"], "cpu": cpu}


def _row(label: str, r: dict) -> str:
    cpu = r["cpu"]
    return (f"{label:14s} {r['seconds']:7.2f} {r['boot']:7.2f} " + " ".join(
        f"{cpu[k]:8.2f}" for k in ("demo", "node", "workers")) + f" {sum(cpu.values()):8.2f}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="warm runs (default 5)")
    parser.add_argument("--baseline", action="append", default=[], metavar="NAME=SRC",
                        help="another gridfl src folder to run side by side")
    args = parser.parse_args(argv)
    here = str(Path(__file__).resolve().parents[1] / "src")
    variants = {"this": here}
    for spec in args.baseline:
        name, _, src = spec.partition("=")
        if not src or not (Path(src) / "gridfl").is_dir():
            raise SystemExit(f"--baseline {spec!r}: expected NAME=SRC with SRC/gridfl")
        variants[name] = src
    with tempfile.TemporaryDirectory(prefix="gridfl-demo-start-") as tmp:
        def place(name: str) -> tuple[Path, Path, dict[str, str]]:
            root = Path(tmp) / name
            env = {**os.environ, "GRIDFL_PLAN_CACHE": str(root / "plans"),
                   "PYTHONPATH": variants[name]}
            return root / "data", root / "out", env

        load_before = os.getloadavg()
        print(f"{'run':14s} {'first s':>7s} {'boot s':>7s} {'demo cpu':>8s} {'node cpu':>8s} "
              f"{'wrk cpu':>8s} {'cpu sum':>8s}")
        cold = {}
        for name in variants:
            cold[name] = run_once(*place(name))
            print(_row(f"{name} cold", cold[name]), flush=True)
        warm: dict[str, list[dict]] = {name: [] for name in variants}
        for i in range(args.runs):
            for name in variants:  # taking turns: the load hits every variant alike
                warm[name].append(run_once(*place(name)))
                print(_row(f"{name} warm {i + 1}", warm[name][-1]), flush=True)
        load_after = os.getloadavg()
    medians = {n: statistics.median(r["seconds"] for r in runs) for n, runs in warm.items()}
    for name, runs in warm.items():
        cpu = statistics.median(sum(r["cpu"].values()) for r in runs)
        print(f"{name}: median of {len(runs)} warm runs: first checkpoint "
              f"{medians[name]:.2f} s after the command (goal 3 s); CPU {cpu:.2f} s, at "
              f"least {cpu / 2:.2f} s on 2 idle cores; cold / warm "
              f"{cold[name]['seconds'] / medians[name]:.1f}x")
    for name in variants:
        if name != "this":
            print(f"this / {name}: {medians['this'] / medians[name]:.2f}x wall (median)")
    print(f"load average (1, 5, 15 min) before {tuple(round(x, 1) for x in load_before)}, "
          f"after {tuple(round(x, 1) for x in load_after)}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main(sys.argv[1:])
