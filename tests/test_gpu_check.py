"""bench/gpu_check.sh --cpu-smoke: the GPU check's every path, end to end on the CPU with tiny sizes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_section():
    env = {**os.environ, "PYTHON": sys.executable, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    p = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--cpu-smoke"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = p.stdout.split("\n\n")[-2]
    assert "FAILED" not in table, table
    for row in ("tiny sdpa/chunked", "tiny trainerd sdpa/chunked", "x the hand loop", "flex vs sdpa",
                "steps 4-6 bitwise equal", "tiny largest micro-batch + act. ckpt"):
        assert row in table, (row, table)
