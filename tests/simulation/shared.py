"""What the simulation tests share: the tiny linear-regression process's configs, and
results.json without its wall-clock fields."""

from __future__ import annotations

import json

FEATURES = 3
CLIENT_CONFIG = {"name": "lin", "version": "1", "batch_size": 8, "lr": 0.05, "max_epochs": 1}
SERVER_CONFIG = {"num_cycles": 2, "max_diffs": 5}



def without_timing(results: dict) -> dict:
    """results.json less the wall-clock fields, the only ones two same-seed runs differ in."""
    out = {k: v for k, v in results.items()
           if k not in ("startup_seconds", "total_seconds", "peak_memory_mb")}
    out["rounds"] = [{k: v for k, v in r.items() if k != "seconds"} for r in results["rounds"]]
    return json.loads(json.dumps(out))
