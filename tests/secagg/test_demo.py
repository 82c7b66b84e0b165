"""``gridfl demo --secure-aggregation``: a short real run (node and worker processes, the
SDK's job.report running the protocol) trains as the plain demo does."""

from __future__ import annotations

import pytest

from gridfl import ConfigError
from gridfl.demo.run import DemoOptions, run_demo
from tests.builders import demo_options


def test_short_demo_run_with_secure_aggregation(tmp_path, capfd):
    pytest.importorskip("torch")
    options = demo_options(tmp_path, clients=6, workers=3, lr=0.1, secure_aggregation=True)
    result = run_demo(options)
    assert "cycle failed" not in capfd.readouterr().err
    assert [c.cycle for c in result.cycles] == [1, 2, 3]
    assert all(c.reports == 3 for c in result.cycles)
    accuracies = [c.test_accuracy for c in result.cycles]
    assert accuracies[-1] > 0.6, accuracies  # 10-class MNIST: chance is 0.1
    assert result.cycles[-1].test_loss < result.cycles[0].test_loss


def test_secure_aggregation_needs_two_workers_per_cycle():
    with pytest.raises(ConfigError, match="at least 2 workers"):
        DemoOptions(clients=10, fraction=0.1, secure_aggregation=True).validate()
