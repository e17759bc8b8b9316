"""bench/scale.py --smoke: the scale benchmark runs end to end and finds every planted duplicate."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_scale_smoke(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "bench/scale.py", "--smoke", "--work", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    recalls = re.findall(r"^recall N=\d+: ([0-9.]+)", done.stdout, re.M)
    assert len(recalls) == 2, done.stdout
    assert all(float(r) == 1.0 for r in recalls), done.stdout
