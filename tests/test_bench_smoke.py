"""Every benchmark in bench/ runs in its --smoke mode (tiny sizes, one timed run) and prints its ratio
line, so that a change to a stage's API breaks the test suite rather than `make bench` months later.
The figures of a smoke run mean nothing; bench/README.md has the real ones. bench/scale.py has its
own test (tests/test_bench_scale.py)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
slow = pytest.mark.slow

# (benchmark, the optional packages of its reference: without them it measures wit alone and prints
# "ratio: n/a").
BENCHMARKS = [
    pytest.param("dump_counting", ["mwxml", "mwparserfromhell"], id="dump_counting"),
    pytest.param("unigram_table", [], id="unigram_table"),
    pytest.param("match", ["ahocorasick", "ahocorasick_rs"], id="match"),
    pytest.param("download", [], id="download", marks=slow),
    pytest.param("corpus", [], id="corpus"),
    pytest.param("neardup", [], id="neardup"),
    pytest.param("stats", [], id="stats"),
    pytest.param("train_data", [], id="train_data", marks=slow),
    pytest.param("upload", [], id="upload"),
    pytest.param("partitions", [], id="partitions"),
    pytest.param("train_throughput", [], id="train_throughput", marks=slow),
]
RATIO = re.compile(r"^ratio: .*?\d+(?:\.\d+)?\s*[x×]", re.M)


@pytest.mark.parametrize(("bench", "baseline"), BENCHMARKS)
def test_bench_smoke(bench: str, baseline: list[str], tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1", "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, f"bench/{bench}.py", "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    if RATIO.search(done.stdout):
        return
    missing = [m for m in baseline if importlib.util.find_spec(m) is None]
    assert missing and re.search(r"^ratio: n/a", done.stdout, re.M), done.stdout
