"""The demo's knobs, McMahan et al.'s names, and the node configs they make."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gridfl._exceptions import ConfigError
from gridfl.compression import KINDS, validate_config
from gridfl.demo.worker import ATTACKS

__all__ = ["DemoOptions"]


@dataclass
class DemoOptions:
    """Knobs of the demo (McMahan et al.'s names in comments)."""

    model: str = "cnn"
    clients: int = 100  # K
    fraction: float = 0.1  # C: share of clients trained per cycle
    epochs: int = 1  # E
    batch_size: int = 10  # B
    lr: float = 0.1
    cycles: int = 20
    target: float | None = 0.98  # stop once the test accuracy reaches this
    iid: bool = True
    seed: int = 0
    workers: int = 10  # OS processes holding the K clients
    parallel: int | None = None  # workers training at once (None: the CPU count; 0: all)
    examples_per_client: int | None = None  # cut shards (quick runs, tests)
    evaluate: bool = True  # evaluate each checkpoint while training runs
    strategy: str = "fedavg"  # server_config.strategy name (docs/configs.md)
    server_lr: float | None = None  # eta / server_learning_rate of a server optimizer
    proximal_mu: float | None = None  # FedProx's mu: strategy fedprox, plan compiled with it
    byzantine: int = 0  # worker processes that report poisoned diffs
    attack: str = "scale"  # what they send: scale (x100), signflip or noise
    # differential privacy (docs/privacy.md): noise multiplier z and clip norm C (the
    # initial one when adaptive); the population is the K clients
    dp_noise: float | None = None
    dp_clip: float | None = None
    dp_adaptive: bool = False
    dp_target_quantile: float = 0.5  # adaptive: the share of update norms C is to sit above
    #: reports compressed as float16, int8 or topk (10%, error feedback); None = plain
    compression: str | None = None
    asynchronous: bool = False  # server_config.mode "async" (FedBuff) instead of cycles
    buffer_size: int = 10  # async: reports per published checkpoint (FedBuff's K)
    slow_workers: int = 0  # worker processes that are `slowdown` times slower
    slowdown: float = 5.0  # how much slower: they sleep (slowdown - 1) x their training time
    secure_aggregation: bool = False  # the node learns only each cycle's sum
    #: federated evaluation (server_config.evaluation) of every n-th checkpoint on each
    #: worker's held-out 10% of its client's examples; None = off
    federated_every: int | None = None
    data_dir: Path = field(default_factory=lambda: Path("data/demo"))
    out_dir: Path = field(default_factory=lambda: Path("results"))

    def validate(self) -> None:
        if self.model not in ("cnn", "2nn"):
            raise ConfigError(f"model must be cnn or 2nn, got {self.model!r}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction C must be in (0, 1], got {self.fraction}")
        if self.parallel is not None and self.parallel < 0:
            raise ConfigError(f"parallel must be 0 (no limit) or more, got {self.parallel}")
        for name in ("clients", "epochs", "batch_size", "cycles", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.workers > self.clients:
            raise ConfigError(f"workers ({self.workers}) cannot exceed clients ({self.clients})")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        self.secure_aggregation_config()
        if self.compression is not None and self.compression not in KINDS:
            raise ConfigError(
                f"compression must be one of {', '.join(KINDS)} (or None), "
                f"got {self.compression!r}"
            )
        if not 0 <= self.byzantine <= self.workers:
            raise ConfigError(
                f"byzantine must be 0 to workers ({self.workers}), got {self.byzantine}"
            )
        if self.attack not in ATTACKS:
            raise ConfigError(f"attack must be one of {', '.join(ATTACKS)}, got {self.attack!r}")
        self.strategy_config()  # the node would refuse it: say so before starting anything
        if (self.dp_noise is None) != (self.dp_clip is None):
            raise ConfigError("differential privacy needs both dp_noise (z) and dp_clip (C)")
        if self.dp_adaptive and self.dp_noise is None:
            raise ConfigError("dp_adaptive needs dp_noise and dp_clip")
        if not 0 <= self.slow_workers <= self.workers:
            raise ConfigError(
                f"slow_workers must be 0 to workers ({self.workers}), got {self.slow_workers}"
            )
        if not 1 <= self.slowdown <= 100:
            raise ConfigError(f"slowdown must be in [1, 100], got {self.slowdown}")
        from gridfl.server.config import validate_server_config  # the node's own rules

        validate_server_config(self.server_config())  # refused: say so before starting

    def strategy_config(self) -> dict | None:
        """``server_config.strategy`` for these options (``None``: FedAvg). Krum and Bulyan
        assume as many Byzantine reports as there are Byzantine workers."""
        from gridfl.server.strategies import OPTIMIZERS, normalize  # the node's own rules

        if self.proximal_mu is not None or self.strategy == "fedprox":
            return self._fedprox_config()
        if self.strategy == "fedavg" and (self.server_lr is None or self.asynchronous):
            return None  # async FedAvg takes --server-lr as server_config.server_lr
        cfg: dict = {"name": self.strategy}
        if self.server_lr is not None:
            key = {"fedavgm": "server_learning_rate"}.get(self.strategy, "eta")
            if self.strategy not in OPTIMIZERS:
                raise ConfigError(
                    f"--server-lr sets a server optimizer's rate ({', '.join(sorted(OPTIMIZERS))});"
                    f" {self.strategy} has none"
                )
            cfg[key] = self.server_lr
        if self.strategy in ("krum", "multikrum", "bulyan"):
            cfg["num_malicious_nodes"] = self.byzantine
        normalize(cfg, max_diffs=self.per_cycle, min_diffs=self.per_cycle)
        return cfg

    def _fedprox_config(self) -> dict:
        from gridfl.server.strategies import normalize

        if self.strategy not in ("fedavg", "fedprox") or self.server_lr is not None:
            raise ConfigError(
                "--proximal-mu runs FedProx, which aggregates with FedAvg: drop --strategy "
                f"{self.strategy}" + (" and --server-lr" if self.server_lr is not None else "")
            )
        if self.proximal_mu is None:
            raise ConfigError("--strategy fedprox needs --proximal-mu (e.g. 0.01)")
        cfg = {"name": "fedprox", "proximal_mu": self.proximal_mu}
        normalize(cfg, max_diffs=self.per_cycle, min_diffs=self.per_cycle)
        return cfg

    def differential_privacy(self) -> dict | None:
        """The process's ``server_config.differential_privacy``, or None."""
        if self.dp_noise is None:
            return None
        clip = (
            {"initial": self.dp_clip, "target_quantile": self.dp_target_quantile}
            if self.dp_adaptive
            else self.dp_clip
        )
        return {"noise_multiplier": self.dp_noise, "clip_norm": clip,
                "population_size": self.clients}

    @property
    def compression_config(self) -> dict | None:
        """``server_config.compression`` for :attr:`compression` (top-k: its default 10%)."""
        return None if self.compression is None else validate_config({"kind": self.compression})

    def secure_aggregation_config(self) -> dict | None:
        """``server_config.secure_aggregation`` for :attr:`secure_aggregation`: every worker
        of a cycle shares with every other, and a bare majority must survive."""
        if not self.secure_aggregation:
            return None
        if self.asynchronous or self.per_cycle < 2:
            raise ConfigError(
                "secure aggregation needs cycles (not --async) of at least 2 workers (C * K)"
            )
        return {"threshold": self.per_cycle // 2 + 1}

    def evaluation_config(self) -> dict | None:
        """``server_config.evaluation`` for :attr:`federated_every`: as many workers
        evaluate as train in a cycle."""
        if self.federated_every is None:
            return None
        return {"every": self.federated_every, "max_workers": self.per_cycle}

    def server_config(self) -> dict:
        """The process's ``server_config``: cycles of ``per_cycle`` workers, or (async)
        FedBuff buffers of ``buffer_size`` reports; ``cycles`` checkpoints either way."""
        if not self.asynchronous:
            return {
                "max_workers": self.per_cycle,
                "min_diffs": self.per_cycle,
                "max_diffs": self.per_cycle,
                "num_cycles": self.cycles,
                "cycle_length": 600,
                "strategy": self.strategy_config(),
                "differential_privacy": self.differential_privacy(),
                "compression": self.compression_config,
                "secure_aggregation": self.secure_aggregation_config(),
                "evaluation": self.evaluation_config(),
            }
        cfg = {
            "mode": "async",
            "buffer_size": self.buffer_size,
            "num_cycles": self.cycles,
            "strategy": self.strategy_config(),
            "differential_privacy": self.differential_privacy(),
            "compression": self.compression_config,
            "evaluation": self.evaluation_config(),
        }
        if self.strategy == "fedavg" and self.server_lr is not None:
            cfg["server_lr"] = self.server_lr
        return cfg

    @property
    def per_cycle(self) -> int:
        """Workers the node accepts per cycle: round(C * K), at most one per process."""
        return max(1, min(self.workers, round(self.fraction * self.clients)))

