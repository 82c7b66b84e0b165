"""The README's quickstart runs as written, against a real node."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tests.harness import LiveNode

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def node(tmp_path):
    from gridfl.server import Settings

    srv = LiveNode(Settings(data_dir=tmp_path, admin_token="readme-admin"))
    yield srv
    srv.stop()


def test_quickstart_hosts_a_process_and_a_worker_reports(node):
    pytest.importorskip("torch")
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = code.replace("127.0.0.1:5000", f"127.0.0.1:{node.port}")
    rng = np.random.default_rng(0)
    env = {
        "ADMIN_TOKEN": "readme-admin",
        "my_images": rng.random((30, 784), dtype=np.float32),
        "my_labels": rng.integers(0, 10, 30),
    }
    exec(compile(code, str(README), "exec"), env)

    from gridfl.host import HostClient

    with HostClient(node.url, admin_token="readme-admin") as host:
        cycle = host.status("mnist", "1.0")["cycles"][0]
    assert cycle["accepted"] == 1 and cycle["reported"] == 1
    assert cycle["num_samples"] == 30
