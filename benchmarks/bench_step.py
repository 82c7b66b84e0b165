"""One training step: compiled ONNX plan (onnxruntime) vs eager PyTorch.

    python -m benchmarks.bench_step [--blocks 5] [--steps 20] [--pause 0.5]

For the McMahan CNN (1,663,370 params), the 2NN (784-200-200-10) with SGD and with Adam,
issue 21's LSTM (Embedding(80, 8) + LSTM(8, 64) + Linear over 20 tokens) and a small
ResNet (two residual blocks, BatchNorm in training mode, 3x32x32 input) at batch 10 and
64, in two settings, each model in a fresh subprocess (a step's time depends on what ran
before it in the same process: the ResNet's ratio at batch 10 was 0.77 run first, 0.93-1.02
run after the other models):

* ``default``: both runtimes with their default thread counts (torch's own default, the
  plan's :func:`gridfl.plan.default_threads`, idle threads do not spin);
* ``1 core``: the process pinned to one core (``os.sched_setaffinity({0})``),
  ``torch.set_num_threads(1)``, onnxruntime ``intra_op_num_threads=1``.

Within a setting, torch and plan run in alternating blocks of ``--steps`` steps (order
flipped every block) with a pause between blocks, so machine noise hits both alike; the
ratio is median(plan step) / median(torch step), and the result the median of the
processes' ratios (``--processes``). Goal: <= 1.0 for every model (issue
21; the CNN's was 1.2). The eager step is the usual ``zero_grad, forward, cross_entropy,
backward, torch.optim.SGD.step``; the plan step is ``plan.execute`` with numpy inputs,
feeding the updated params back in, as a worker does. CPU time (all threads of the
process) is printed next to wall time: on a busy machine it shows the work done, free of
the time a runtime spent descheduled.

The figures, and where the plan's time goes, are in docs/performance.md ("Training step
and State codec").
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

MODELS = ("cnn", "2nn", "2nn-adam", "lstm", "resnet")
BATCHES = (10, 64)
LR = 0.01


def build_model(name: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(), nn.Linear(512, 10),
        )
    if name in ("2nn", "2nn-adam"):
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(),
            nn.Linear(200, 10),
        )
    if name == "lstm":  # issue 21's character model: Embedding(80, 8) + LSTM(8, 64), seq 20
        class SeqNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb, self.rnn = nn.Embedding(80, 8), nn.LSTM(8, 64, batch_first=True)
                self.fc = nn.Linear(64, 80)

            def forward(self, x):
                h, _ = self.rnn(self.emb(x))
                return self.fc(h[:, -1])
        return SeqNet()
    if name == "resnet":  # two residual blocks, BatchNorm in training mode, CIFAR input
        class Block(nn.Module):
            def __init__(self, c):
                super().__init__()
                self.body = nn.Sequential(
                    nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                    nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

            def forward(self, x):
                return torch.relu(self.body(x) + x)
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            Block(16), Block(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    raise ValueError(name)


def batch_of(name: str, n: int, gen):
    """A batch for ``name``: MNIST-shaped images, CIFAR-shaped images or token sequences."""
    import torch

    if name == "lstm":
        return torch.randint(0, 80, (n, 20), generator=gen), torch.randint(0, 80, (n,),
                                                                          generator=gen)
    shape = (3, 32, 32) if name == "resnet" else (1, 28, 28)
    return torch.rand(n, *shape, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def optimizers(name: str, model):
    """(gridfl optimizer, the same torch.optim optimizer on ``model``)."""
    import torch

    from gridfl.compiler import SGD, Adam

    if name == "2nn-adam":
        return Adam(lr=LR), torch.optim.Adam(model.parameters(), lr=LR)
    return SGD(lr=LR), torch.optim.SGD(model.parameters(), lr=LR)


def compile_plans(models, conv_weight_grad: str, out_dir: str) -> dict[str, str]:
    import torch

    from gridfl.compiler import compile_training_plan

    paths = {}
    for name in models:
        model = build_model(name)
        X, y = batch_of(name, 16, torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        plan = compile_training_plan(
            model, loss="cross_entropy", optimizer=optimizers(name, model)[0],
            example_data=X, example_target=y, conv_weight_grad=conv_weight_grad,
        )
        print(f"  compiled {name} plan in {time.perf_counter() - t0:.1f} s "
              f"({len(plan.to_bytes())} bytes)", file=sys.stderr)
        paths[name] = os.path.join(out_dir, f"{name}.onnx")
        with open(paths[name], "wb") as f:
            f.write(plan.to_bytes())
    return paths


def _worker(spec: dict) -> dict:
    """Runs in a subprocess: measure one setting for every (model, batch)."""
    if spec["single"]:
        os.sched_setaffinity(0, {0})
    import torch
    import torch.nn.functional as F

    from gridfl.compiler import model_tensors
    from gridfl.plan import Plan

    if spec["single"]:
        torch.set_num_threads(1)
    threads = 1 if spec["single"] else None
    results = []
    for name, path in spec["plans"].items():
        with open(path, "rb") as f:
            plan = Plan.from_bytes(f.read(), threads=threads)
        if spec.get("profile"):
            plan._session = _profiling_session(plan, spec["profile"], name)
        for batch in spec["batches"]:
            X, y = batch_of(name, batch, torch.Generator().manual_seed(batch))
            model = build_model(name)
            opt = optimizers(name, model)[1]

            def torch_step(model=model, opt=opt, X=X, y=y):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(X), y)
                loss.backward()
                opt.step()
                return loss

            Xn, yn = X.numpy(), y.numpy()
            # params, buffers (BatchNorm), optimizer state (zeros): fed back every step
            carried = plan.bind(data=Xn, target=yn, client_config={"lr": LR},
                                params=model_tensors(build_model(name)))[4:]
            state = {"carried": carried}

            def plan_step(Xn=Xn, yn=yn, batch=batch, state=state, plan=plan):
                out = plan.execute(Xn, yn, batch, LR, *state["carried"])
                state["carried"] = out[2:]
                return out[0]

            for _ in range(3):  # warm up both (session creation, allocator, caches)
                torch_step()
                plan_step()
            times = {"torch": [], "plan": []}
            cpu = {"torch": [], "plan": []}
            order = ["torch", "plan"]
            for block in range(spec["blocks"]):
                for which in order if block % 2 == 0 else order[::-1]:
                    fn = torch_step if which == "torch" else plan_step
                    for _ in range(spec["steps"]):
                        c0, t0 = time.process_time(), time.perf_counter()
                        fn()
                        times[which].append(time.perf_counter() - t0)
                        cpu[which].append(time.process_time() - c0)
                    time.sleep(spec["pause"])
            med = {k: statistics.median(v) for k, v in times.items()}
            cmed = {k: statistics.median(v) for k, v in cpu.items()}
            results.append({
                "model": name, "batch": batch,
                "torch_ms": med["torch"] * 1e3, "plan_ms": med["plan"] * 1e3,
                "ratio": med["plan"] / med["torch"],
                "torch_cpu_ms": cmed["torch"] * 1e3, "plan_cpu_ms": cmed["plan"] * 1e3,
                "cpu_ratio": cmed["plan"] / cmed["torch"],
                "torch_threads": torch.get_num_threads(), "plan_threads": plan.threads,
            })
    if spec.get("profile"):
        plan._session.end_profiling()
    return {"results": results}


def _profiling_session(plan, prefix: str, name: str):
    """The session the worker runs (blocked layout, gridfl's node order), profiled."""

    def profile(so):
        so.enable_profiling = True
        so.profile_file_prefix = f"{prefix}_{name}"

    return plan._optimized_session(plan._runtime_bytes(), configure=profile)


def run_setting(single: bool, plans: dict, args) -> list[dict]:
    """Each model in ``args.processes`` fresh subprocesses, one after another: no model's
    step runs after another model's, and a process in which one runtime runs slower
    throughout is one ratio of several. A row holds the medians over the processes."""
    rows = []
    for name, path in plans.items():
        runs = [_run_worker(single, {name: path}, args) for _ in range(args.processes)]
        for per_process in zip(*runs, strict=True):  # one (model, batch) in each process
            row = dict(per_process[0])
            for key in ("torch_ms", "plan_ms", "ratio", "torch_cpu_ms", "plan_cpu_ms",
                        "cpu_ratio"):
                row[key] = statistics.median(r[key] for r in per_process)
            row["ratios"] = [r["ratio"] for r in per_process]
            rows.append(row)
    return rows


def _run_worker(single: bool, plans: dict, args) -> list[dict]:
    spec = {
        "single": single, "plans": plans, "batches": args.batches, "blocks": args.blocks,
        "steps": args.steps, "pause": args.pause, "profile": args.profile,
    }
    code = "import json,sys; from benchmarks.bench_step import _worker; " \
           "print(json.dumps(_worker(json.loads(sys.argv[1]))))"
    env = dict(os.environ)
    if single:
        env["OMP_NUM_THREADS"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
        cwd=root, env=env, check=False,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"benchmark worker failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])["results"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--settings", default="default,1core")
    p.add_argument("--blocks", type=int, default=6, help="alternating blocks per runtime")
    p.add_argument("--steps", type=int, default=15, help="steps per block")
    p.add_argument("--pause", type=float, default=0.3, help="seconds between blocks")
    p.add_argument("--processes", type=int, default=3,
                   help="fresh processes per model (the median ratio is the result)")
    p.add_argument("--conv-weight-grad", default="auto",
                   choices=("auto", "per_offset", "shift", "conv"))
    p.add_argument("--plans-dir", help="reuse/keep compiled plans here")
    p.add_argument("--profile", help="write onnxruntime profiles with this path prefix")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    models = [m for m in args.models.split(",") if m]
    settings = [s for s in args.settings.split(",") if s]

    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.plans_dir or tmp
        os.makedirs(out_dir, exist_ok=True)
        existing = {m: os.path.join(out_dir, f"{m}.onnx") for m in models}
        if args.plans_dir and all(os.path.exists(v) for v in existing.values()):
            plans = existing
        else:
            print("compiling plans...", file=sys.stderr)
            plans = compile_plans(models, args.conv_weight_grad, out_dir)
        rows = []
        for setting in settings:
            single = setting != "default"
            for r in run_setting(single, plans, args):
                r["setting"] = "1 core" if single else "default"
                rows.append(r)

    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    goals = {"cnn": 1.0, "2nn": 1.0, "2nn-adam": 1.0, "lstm": 1.0, "resnet": 1.0}
    print(f"one training step, plan (onnxruntime) vs eager torch; {args.blocks} alternating "
          f"blocks x {args.steps} steps in each of {args.processes} processes per model")
    print("wall: median wall-clock ms per step; cpu: median process CPU ms per step (all "
          "threads); medians over the processes, each process's ratio in the last column")
    print(f"{'model':<8} {'batch':>5} {'setting':<8} {'threads t/p':>11} {'torch ms':>9} "
          f"{'plan ms':>8} {'plan/torch':>10}  {'goal':<7} {'cpu t/p ms':>15} {'cpu ratio':>9}"
          f"        per process")
    ok = True
    for r in rows:
        goal = goals[r["model"]]
        met = r["ratio"] <= goal
        ok &= met
        print(f"{r['model']:<8} {r['batch']:>5} {r['setting']:<8} "
              f"{r['torch_threads']:>5}/{r['plan_threads']:<5} {r['torch_ms']:>9.2f} "
              f"{r['plan_ms']:>8.2f} {r['ratio']:>10.2f}  <= {goal:<4} "
              f"{r['torch_cpu_ms']:>7.2f}/{r['plan_cpu_ms']:<7.2f} {r['cpu_ratio']:>9.2f}"
              f"  {'ok' if met else 'MISSED':<6}  {' '.join(f'{x:.2f}' for x in r['ratios'])}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
