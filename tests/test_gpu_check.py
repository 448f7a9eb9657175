"""benchmarks/gpu_check.sh, the one script for a lent GPU machine: its --dry-run (the parts a
machine without a GPU can check) runs here."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    if shutil.which("timeout") is None:
        pytest.skip("coreutils timeout not found")
    out = tmp_path / "gpu"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["passed"] is True
    status = {s["step"]: s["status"] for s in summary["steps"]}
    # every GPU step is in the plan; the checkable ones ran
    for planned in ("sanitizer-memcheck", "sanitizer-racecheck", "tests", "kernels",
                    "torch-backend"):
        assert status[planned] == "planned"
    assert status["entry-points"] == "ok" and status["tests-collect"] == "ok"
    if shutil.which("nvcc") and shutil.which("cmake"):
        assert status["build-configure"] == "ok"
    collected = (out / "tests-collect.log").read_text()
    m = re.search(r"(\d+)/\d+ tests collected", collected)
    assert m and int(m.group(1)) >= 10, collected[-500:]  # the GPU tests it would run
    assert "usage" in (out / "entry-points.log").read_text()
    assert (out / "summary.md").read_text().startswith("# GPU check (dry run")
