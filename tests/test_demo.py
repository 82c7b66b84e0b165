"""A short federated MNIST run, end to end: node process, worker processes (no torch),
compiled plans, checkpoints, evaluation, results JSON and plot."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from gridfl._exceptions import ConfigError
from gridfl.demo.run import DemoOptions, run_demo
from tests.builders import demo_options
from tests.harness import Demo, alive


def test_short_demo_run_trains_and_writes_results(tmp_path, capfd):
    pytest.importorskip("torch")
    seen, steps = [], []
    options = demo_options(tmp_path, lr=0.1)
    dashboards = []
    result = run_demo(options, on_cycle=seen.append, on_step=steps.append,
                      on_dashboard=lambda url, path: dashboards.append((url, path)))
    # the dashboard's URL, and the token to sign in with in a file only this user reads
    ((url, token_file),) = dashboards
    assert url.startswith("http://127.0.0.1:") and url.endswith("/dashboard/")
    assert token_file.stat().st_mode & 0o777 == 0o600 and len(token_file.read_text()) > 16

    assert [c.cycle for c in result.cycles] == [1, 2, 3] == [c.cycle for c in seen]
    # start-up shows each step as it begins: the processes first (they boot while the
    # rest runs), the data, both compilations, hosting
    assert [s.split()[0].rstrip(":") for s in steps] == [
        "starting", "loading", "compiling", "compiling", "node", "training"
    ], steps
    assert "training plan" in steps[2] and "evaluation plan" in steps[3]
    assert "2 worker processes" in steps[0] and "hosting mnist-2nn" in steps[4]
    # all cycles ran to the end: the workers stop without reporting any failure
    assert "cycle failed" not in capfd.readouterr().err
    assert all(c.reports == 2 for c in result.cycles)
    accuracies = [c.test_accuracy for c in result.cycles]
    assert accuracies[-1] > 0.6, accuracies  # 10-class MNIST: chance is 0.1
    assert result.cycles[-1].test_loss < result.cycles[0].test_loss
    assert result.startup_seconds is not None and result.peak_rss_mb > 0
    # PSS shares the pages the processes have in common out among them: never above RSS
    assert 0 < result.peak_pss_mb <= result.peak_rss_mb
    mem = result.memory_mb
    assert 0 < mem["node_pss"] <= mem["node_rss"] and 0 < mem["worker_pss"] <= mem["worker_rss"]

    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["settings"]["model"] == "2nn" and len(saved["cycles"]) == 3
    assert saved["peak_pss_mb"] == result.peak_pss_mb and saved["memory_mb"] == mem
    png = (tmp_path / "out" / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_demo_stops_at_the_target_accuracy(tmp_path, capfd):
    pytest.importorskip("torch")
    options = demo_options(tmp_path, cycles=10, target=0.5)
    result = run_demo(options)
    assert result.cycles[-1].test_accuracy >= 0.5
    assert len(result.cycles) < 10
    # stopping at the target is the normal end: the workers' refused last reports
    # ("cycle N is closed (stopped)") are not printed as failures
    assert "cycle failed" not in capfd.readouterr().err


def test_worker_shard_reads_one_client_at_a_time(tmp_path):
    import numpy as np

    from gridfl.demo.worker import Shard, write_shard

    rng = np.random.default_rng(0)
    clients = [
        (rng.random((n, 4), dtype=np.float32), rng.integers(0, 10, n)) for n in (5, 3, 6)
    ]
    path = tmp_path / "shard-0"
    write_shard(path, clients)

    shard = Shard(path)
    assert len(shard) == 3
    for i in (0, 2, -1, np.int64(1)):
        x, y = shard[i]
        j = int(i) % 3
        assert np.array_equal(x, clients[j][0]) and np.array_equal(y, clients[j][1])
        assert x.dtype == np.float32 and x.flags.writeable
        assert not isinstance(x, np.memmap) and x.base is None  # a copy: no file stays mapped
    with pytest.raises(IndexError):
        shard[3]
    assert [len(x) for x, _ in shard[1:]] == [3, 6]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(list(Shard(path)), shard, strict=True))
    with pytest.raises(ValueError, match="as many targets"):
        write_shard(tmp_path / "bad", [(clients[0][0], clients[1][1])])


def test_progress_follows_every_cycle_of_a_long_run(tmp_path, monkeypatch):
    """The demo asks the node for the few newest cycles only, and for more when more
    closed while its request was held; it must still take in every completed cycle of a long run
    (it once stopped counting at the 100th and missed the target), also when cycles close
    between its two status calls, and step over cycles that expired without a model."""
    import subprocess
    import sys
    import types

    from gridfl.demo import run as demo_run
    from gridfl.demo.report import RunResult
    from gridfl.demo.run import _watch

    def expired(s):
        return s % 7 == 0

    class Host:  # a 250-cycle run: 15 cycles close while a request is held, one meanwhile
        def __init__(self):
            self.done = 0
            self.asked: list[int] = []
            self.held: list[int] = []  # the `after` of each held request

        def status(self, name, version, cycles=100, wait=0.0, after=None):
            assert 1 <= cycles <= 1000  # what the node accepts
            self.asked.append(cycles)
            if wait:  # held until a cycle after `after` closes: one that has not yet
                assert 0 < wait <= 60 and after is not None
                self.held.append(after)
                self.done = min(250, self.done + 14)
            self.done = min(250, self.done + 1)
            window = [
                {
                    "sequence": s,
                    "status": "expired" if expired(s) else "completed",
                    "result_checkpoint": None if expired(s) else s + 1,
                    "reported": 10,
                    "closed_at": s + 1.0,
                    "start": float(s),
                    "metrics": {},
                }
                for s in range(max(1, self.done - cycles + 1), self.done + 1)
            ]
            return {
                "cycles": window[::-1],
                "current": None if self.done == 250 else 1,
                "status": "finished" if self.done == 250 else "running",
            }

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    procs = [subprocess.Popen(sleeper) for _ in range(2)]
    try:
        options = DemoOptions(
            model="2nn",
            target=None,
            evaluate=False,
            data_dir=tmp_path / "d",
            out_dir=tmp_path / "o",
        )
        result = RunResult(settings={})
        host = Host()
        # the node's clock runs with perf_counter here: node up (perf 0.0) is at node time 0
        monkeypatch.setattr(demo_run, "time", types.SimpleNamespace(
            perf_counter=time.perf_counter, monotonic=time.monotonic, time=time.perf_counter))
        _watch(host, "m", "1", 0.0, options, None, None, result, procs, None, {})
    finally:
        for p in procs:
            p.kill()
    assert [c.cycle for c in result.cycles] == [s for s in range(1, 251) if not expired(s)]
    # start-up is the node's closing time of the first cycle, whenever a poll saw it
    assert result.startup_seconds == 2.0
    # each held request asks for the newest few, then back to the last cycle taken in
    # plus a margin; the next is held until a cycle after the last one taken in closes
    w = demo_run._WATCH_WINDOW
    assert host.asked[:4] == [w, 15 + w, w, 31 - 16 + w]
    assert host.held[:3] == [0, 16, 32]


def test_compute_slots_let_n_workers_train_at_once(tmp_path):
    """The demo's FIFO of slot bytes: with 2 slots, never more than 2 holders at once,
    and every holder gets its turn."""
    import threading

    from gridfl.demo.launch import compute_slots
    from gridfl.demo.worker import ComputeSlots

    holding, peak, done = [0], [0], []
    lock = threading.Lock()

    def worker(path):
        slots = ComputeSlots(path)  # its own descriptor, as each worker process has
        for _ in range(3):
            with slots:
                with lock:
                    holding[0] += 1
                    peak[0] = max(peak[0], holding[0])
                time.sleep(0.02)
                with lock:
                    holding[0] -= 1
        done.append(1)

    with compute_slots(2) as path:
        threads = [threading.Thread(target=worker, args=(path,)) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert len(done) == 5 and peak[0] == 2


def test_compute_slots_off():
    from gridfl.demo.launch import compute_slots

    with compute_slots(0) as path:
        assert path is None


def test_memory_is_read_at_most_every_few_seconds_while_polling(monkeypatch):
    """Reading PSS is costly (page-table walks): polls within ``every`` seconds of the last
    reading skip it; the final reading (no ``every``) always happens."""
    import types

    from gridfl.demo import memory as demo_memory
    from gridfl.demo.memory import PeakMemory

    reads = []
    monkeypatch.setattr(demo_memory, "memory_kb", lambda pid: reads.append(pid) or (10, 5))
    me = types.SimpleNamespace(pid=os.getpid())
    memory = PeakMemory(me, [me, me])
    for _ in range(5):
        memory.sample(every=60)
    assert len(reads) == 3  # one reading of the node and two workers
    memory.sample()
    assert len(reads) == 6 and memory.peak_rss_mb == round(30 / 1024, 1)


def test_demo_with_a_byzantine_worker_and_the_median(tmp_path, capfd):
    """One of 5 workers reports its diff x100 every cycle; the median keeps training."""
    pytest.importorskip("torch")
    options = demo_options(tmp_path, clients=5, fraction=1.0, workers=5,
                           strategy="fedmedian", byzantine=1, attack="scale")
    result = run_demo(options)
    assert all(c.reports == 5 for c in result.cycles)
    assert result.cycles[-1].test_accuracy > 0.6, [c.test_accuracy for c in result.cycles]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["settings"]["strategy"] == "fedmedian" and saved["settings"]["byzantine"] == 1


def test_demo_strategy_options_are_checked_before_anything_starts():
    from gridfl._exceptions import ConfigError

    assert DemoOptions().strategy_config() is None
    assert DemoOptions(strategy="fedadam", server_lr=0.01).strategy_config() == {
        "name": "fedadam", "eta": 0.01
    }
    assert DemoOptions(strategy="fedavgm", server_lr=0.5).strategy_config() == {
        "name": "fedavgm", "server_learning_rate": 0.5
    }
    # Krum assumes as many Byzantine reports as Byzantine workers
    assert DemoOptions(strategy="krum", byzantine=2).strategy_config() == {
        "name": "krum", "num_malicious_nodes": 2
    }
    for bad, message in [
        (DemoOptions(strategy="fedsgd"), "strategy.name must be one of"),
        (DemoOptions(strategy="fedmedian", server_lr=0.1), "fedmedian has none"),
        (DemoOptions(strategy="krum", byzantine=4), "needs max_diffs >= 11"),
        (DemoOptions(byzantine=11), "byzantine must be 0 to workers (10)"),
        (DemoOptions(attack="flood"), "attack must be one of"),
    ]:
        with pytest.raises(ConfigError, match=None) as e:
            bad.validate()
        assert message in str(e.value)


def test_poisoned_diffs():
    import numpy as np

    from gridfl.demo.worker import poison

    rng = np.random.default_rng(0)
    d = [rng.normal(scale=0.01, size=(30, 20)).astype(np.float32)]
    assert poison(d, "scale", rng)[0].dtype == np.float32
    np.testing.assert_allclose(poison(d, "scale", rng)[0], d[0] * 100, rtol=1e-6)
    np.testing.assert_array_equal(poison(d, "signflip", rng)[0], -d[0])
    noisy = poison(d, "noise", rng)[0]
    rms = float(np.sqrt(np.mean(d[0].astype(np.float64) ** 2)))
    assert 80 * rms < float(noisy.std()) < 120 * rms


def test_demo_with_differential_privacy_reports_epsilon(tmp_path):
    """--dp-noise / --dp-clip: every cycle's epsilon in the results is dp-accounting's for
    q = per-cycle workers / clients, and the plot gets its accuracy-against-epsilon panel."""
    pytest.importorskip("torch")
    dp_accounting = pytest.importorskip("dp_accounting")
    options = demo_options(
        tmp_path,
        examples_per_client=100,
        dp_noise=1.0,
        dp_clip=0.1,  # noise z*C/m = 0.05 a value: a 2NN trains on through it
        dp_adaptive=True,
    )
    result = run_demo(options)
    want = []
    for t in (1, 2, 3):
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(2 / 4, dp_accounting.GaussianDpEvent(1.0)), t
        )
        want.append(dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(1e-5))
    assert [c.epsilon for c in result.cycles] == pytest.approx(want, rel=1e-9)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [c["epsilon"] for c in saved["cycles"]] == pytest.approx(want, rel=1e-9)
    assert (tmp_path / "out" / "accuracy.png").read_bytes().startswith(b"\x89PNG")


def test_demo_adaptive_clip_norm_tracks_the_target_quantile_of_update_norms(tmp_path):
    """--dp-adaptive (Andrew et al. 2021): after 30 cycles the clip norm the node uses is
    within 10% of the target quantile of the workers' update norms. The norms are the
    ones the demo's workers logged; the node's own count of reports under each cycle's
    clip norm (privacy_cycles.unclipped in its database) must agree with them."""
    import itertools
    import math
    import sqlite3

    import numpy as np

    pytest.importorskip("torch")
    pytest.importorskip("dp_accounting")
    options = demo_options(
        tmp_path, clients=12, workers=6, fraction=0.5, cycles=40, examples_per_client=100,
        dp_noise=0.1, dp_clip=0.5, dp_adaptive=True,
    )
    result = run_demo(options)
    cycles = result.cycles
    assert [c.cycle for c in cycles] == list(range(1, 41))
    assert cycles[0].clip_norm == 0.5  # the initial C
    with sqlite3.connect(tmp_path / "data" / "gridfl.db") as db:
        unclipped = dict(db.execute(
            "SELECT c.sequence, p.unclipped FROM privacy_cycles p "
            "JOIN cycles c ON c.id = p.cycle_id"
        ).fetchall())
    for c in cycles:
        assert len(c.update_norms) == c.reports == 6
        assert unclipped[c.cycle] == sum(n <= c.clip_norm for n in c.update_norms), c
        assert c.norm_quantile == pytest.approx(float(np.quantile(c.update_norms, 0.5)))
    # C moves by exp(-lr (b - target)) with b in [0, 1]: at most exp(0.2 * 0.5) a cycle
    for a, b in itertools.pairwise(cycles):
        assert abs(math.log(b.clip_norm / a.clip_norm)) <= 0.1 + 1e-12
    # cycles 31-40: C's geometric mean against the median of their 60 norms
    late = cycles[30:]
    target = float(np.quantile([n for c in late for n in c.update_norms], 0.5))
    clip = math.exp(np.mean([math.log(c.clip_norm) for c in late]))
    assert abs(clip / target - 1) <= 0.10, (clip, target)
    # the first C (0.5) was not already there: the norms moved it
    assert abs(cycles[0].clip_norm / target - 1) > 0.10
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["cycles"][35]["update_norms"] == cycles[35].update_norms


def test_demo_refuses_half_a_privacy_setting():
    from gridfl._exceptions import ConfigError

    with pytest.raises(ConfigError, match="both dp_noise"):
        DemoOptions(dp_noise=1.0).validate()
    with pytest.raises(ConfigError, match="dp_adaptive needs"):
        DemoOptions(dp_adaptive=True).validate()
def test_demo_compression_option():
    """--compression maps to server_config.compression (top-k: 10%); anything else is
    refused before a process starts."""
    assert DemoOptions(compression="topk").compression_config == {"kind": "topk", "fraction": 0.1}
    assert DemoOptions(compression="int8").compression_config == {"kind": "int8"}
    assert DemoOptions().compression_config is None
    with pytest.raises(ConfigError, match="compression must be one of float16, int8, topk"):
        DemoOptions(compression="zip").validate()


def test_async_demo_publishes_buffers_with_a_slow_worker(tmp_path, capfd):
    """``gridfl demo --async --buffer-size 3 --slow-workers 1``: FedBuff buffers of 3
    reports, the fast worker reporting more often than the slow one."""
    pytest.importorskip("torch")
    options = demo_options(tmp_path, cycles=4, asynchronous=True, buffer_size=3,
                           slow_workers=1, slowdown=5.0)
    assert options.server_config()["mode"] == "async"
    result = run_demo(options)
    assert [c.cycle for c in result.cycles] == [1, 2, 3, 4]
    assert all(c.reports == 3 for c in result.cycles)
    assert result.cycles[-1].test_accuracy > 0.6, [c.test_accuracy for c in result.cycles]
    assert "cycle failed" not in capfd.readouterr().err


def test_async_demo_options_are_checked():
    from gridfl._exceptions import ConfigError

    assert DemoOptions(asynchronous=True, server_lr=0.5).server_config()["server_lr"] == 0.5
    for bad, message in [
        (DemoOptions(asynchronous=True, buffer_size=0), "buffer_size must be an integer >= 1"),
        (DemoOptions(asynchronous=True, strategy="fedmedian"), "needs every diff"),
        (DemoOptions(slow_workers=11), "slow_workers must be 0 to workers (10)"),
        (DemoOptions(slowdown=0.5), "slowdown must be in [1, 100]"),
    ]:
        with pytest.raises(ConfigError) as e:
            bad.validate()
        assert message in str(e.value)


def test_demo_with_federated_evaluation(tmp_path, capfd):
    """``federated_every=1``: the workers evaluate every checkpoint on their held-out 10%;
    the node's weighted means land next to the central evaluation, in the JSON and plot."""
    pytest.importorskip("torch")
    options = DemoOptions(
        model="2nn", clients=4, fraction=0.5, workers=2, cycles=3, target=None,
        examples_per_client=300, lr=0.1, federated_every=1,
        data_dir=tmp_path / "data", out_dir=tmp_path / "out",
    )
    result = run_demo(options)
    assert "cycle failed" not in capfd.readouterr().err
    assert [c.cycle for c in result.cycles] == [1, 2, 3]
    federated = [c.federated_accuracy for c in result.cycles]
    assert all(a is not None for a in federated), federated
    assert federated[-1] > 0.5, federated  # 10-class MNIST: chance is 0.1
    assert all(c.federated_loss > 0 for c in result.cycles)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["cycles"][-1]["federated_accuracy"] == federated[-1]
    assert saved["settings"]["federated_every"] == 1


def test_demo_federated_evaluation_is_refused_where_the_node_refuses_it():
    with pytest.raises(ConfigError, match="has no cycle to evaluate after"):
        DemoOptions(federated_every=1, asynchronous=True).validate()
    with pytest.raises(ConfigError, match="not combined with secure_aggregation"):
        DemoOptions(federated_every=1, secure_aggregation=True, fraction=0.5,
                    workers=10).validate()


def test_demo_proximal_mu_runs_fedprox(tmp_path, capfd):
    """``--proximal-mu``: the plan is compiled with the proximal term and hosted with
    strategy fedprox; the demo workers (no torch) train it and the model learns."""
    pytest.importorskip("torch")
    options = DemoOptions(
        model="2nn", clients=4, fraction=0.5, workers=2, cycles=3, target=None,
        examples_per_client=300, proximal_mu=0.01,
        data_dir=tmp_path / "data", out_dir=tmp_path / "out",
    )
    result = run_demo(options)
    assert "cycle failed" not in capfd.readouterr().err
    assert all(c.reports == 2 for c in result.cycles)
    assert result.cycles[-1].test_accuracy > 0.6, [c.test_accuracy for c in result.cycles]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["settings"]["proximal_mu"] == 0.01


def test_demo_proximal_mu_options_are_checked():
    assert DemoOptions(proximal_mu=0.1).strategy_config() == {
        "name": "fedprox", "proximal_mu": 0.1}
    assert DemoOptions(strategy="fedprox", proximal_mu=0.0).strategy_config() == {
        "name": "fedprox", "proximal_mu": 0.0}
    for bad, message in [
        (DemoOptions(strategy="fedprox"), "--strategy fedprox needs --proximal-mu"),
        (DemoOptions(proximal_mu=-1.0), "proximal_mu must be a number >= 0"),
        (DemoOptions(strategy="fedadam", proximal_mu=0.1), "drop --strategy fedadam"),
        (DemoOptions(proximal_mu=0.1, server_lr=0.5), "and --server-lr"),
    ]:
        with pytest.raises(ConfigError) as e:
            bad.validate()
        assert message in str(e.value)


def test_second_demo_takes_its_plans_from_the_cache(tmp_path, monkeypatch):
    """The first run compiles and caches the model and both plans; the second reads them
    (no compiler process) and trains the same model."""
    pytest.importorskip("torch")
    monkeypatch.setenv("GRIDFL_PLAN_CACHE", str(tmp_path / "cache"))
    runs = []
    for i in range(2):
        steps: list[str] = []
        options = demo_options(tmp_path, lr=0.1, cycles=1, out_dir=tmp_path / f"out{i}")
        result = run_demo(options, on_step=steps.append)
        runs.append((steps, result))
    (first, r1), (second, r2) = runs
    assert any(s.startswith("compiling the 2NN") for s in first), first
    assert any(s.startswith("plans cached in") for s in first), first
    assert not any(s.startswith("compiling") for s in second), second
    # the second run loads no MNIST: its shards and test set are ready in the data dir,
    # read (like the plans) while the node and the workers, started first, boot
    assert [s.split()[0].rstrip(":") for s in second] == ["starting", "shards", "plans", "node",
                                              "training"], second
    assert second[1].startswith("shards found in") and "plans found in the cache" in second[2]
    assert len(list((tmp_path / "cache").glob("*.entry"))) == 1
    assert len(list((tmp_path / "data").glob("ready-*"))) == 1
    assert r1.cycles[0].reports == r2.cycles[0].reports == 2
    assert r2.first_checkpoint_at is not None


def _left_running(pids, timeout: float = 10) -> set[int]:
    """Those of ``pids`` still running after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_forked_workers_exit_when_the_demo_dies_before_go(tmp_path):
    """Workers wait for the start signal; a demo process that dies first (killed, or
    crashed) leaves no worker behind."""
    import subprocess
    import sys

    script = tmp_path / "dies.py"
    script.write_text(
        "import os, sys, time\n"
        "from gridfl.demo.launch import Workers\n"
        "if __name__ == '__main__':\n"
        "    w = Workers.start([['ws://127.0.0.1:9', 'x', '1', 'none']] * 2, env={})\n"
        "    print(' '.join(str(p.pid) for p in w.processes), flush=True)\n"
        "    time.sleep(1.0)\n"
        "    os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    pids = [int(p) for p in out.split()]
    assert len(pids) == 2
    assert not _left_running(pids)


def _long_demo(tmp_path) -> Demo:
    """A 2NN demo of more cycles than any test waits for, once its workers train."""
    pytest.importorskip("torch")  # the demo compiles its plans on the host
    demo = Demo(["--model", "2nn", "-K", "4", "-C", "0.5", "--workers", "2",
                 "--examples-per-client", "300", "--cycles", "1000",
                 "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out")])
    demo.wait_for(r"training: ")
    time.sleep(1.0)  # mid-cycle: workers downloading, training and reporting
    return demo


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 1), (signal.SIGTERM, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_a_stopped_demo_stops_its_node_and_workers(tmp_path, signum, code):
    """Ctrl-C, or SIGTERM (``kill``, a CI timeout, ``docker stop``), ends the demo and
    every process it started (in about a second here)."""
    demo = _long_demo(tmp_path)
    started = demo.descendants()
    assert len(started) >= 4, started  # the node, the fork server and two workers at least
    assert demo.stop(signum, timeout=60) == code
    assert not _left_running(started), demo.output


def test_workers_end_with_a_killed_demo(tmp_path):
    """``kill -9`` of the demo runs none of its code, yet its workers do not go on
    training alone: they end once the demo process is gone."""
    demo = _long_demo(tmp_path)
    started = demo.descendants()
    node = {p for p in started if b"gridfl\0serve" in Path(f"/proc/{p}/cmdline").read_bytes()}
    assert len(node) == 1
    try:
        assert demo.stop(signal.SIGKILL) == -signal.SIGKILL
        assert not _left_running(started - node)
    finally:
        for p in node:  # nothing of the demo's ran to stop it
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGTERM)
