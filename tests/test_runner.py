"""The stage runner: partitions, resume after SIGKILL, fingerprints, and Ray against the local pool."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, SAMPLE_DUMP, wit, write_recipe

from queries.dump import plan_parts
from queries.stage import QueriesStage
from wit_builder.recipe import load_recipe
from wit_builder.runner import LocalExecutor, run_stage
from wit_builder.workspace import Run

PARTITION_MB = 0.05  # about 50 KB of bz2: the sample splits into several partitions


def outputs(run_dir: Path) -> dict[str, bytes]:
    """Every output byte of the stage, by relative path (markers and logs aside)."""
    return {str(p.relative_to(run_dir)): p.read_bytes()
            for p in sorted((run_dir / "queries").rglob("*")) if p.is_file()}


def test_multistream_splits_into_byte_ranges_with_the_same_result(tmp_path, multistream_dump):
    parts = plan_parts(str(multistream_dump), int(PARTITION_MB * (1 << 20)))
    assert len(parts) >= 4
    assert parts[0].start == 0 and parts[-1].end == multistream_dump.stat().st_size
    assert all(a.end == b.start for a, b in zip(parts, parts[1:]))

    kw = dict(min_count=50, bigram_min_count=5, min_pmi=8.0, title_min_inlinks=1,
              partition_mb=PARTITION_MB)
    whole = Run(load_recipe(write_recipe(tmp_path, "whole", wikipedia=[str(SAMPLE_DUMP)], **kw)))
    split = Run(load_recipe(write_recipe(tmp_path, "split", run={"workers": 2},
                                         wikipedia=[str(multistream_dump)], **kw)))
    run_stage(QueriesStage(), whole, LocalExecutor(1))
    info = run_stage(QueriesStage(), split, LocalExecutor(2))
    assert info["partitions"] == len(parts)
    a = pq.read_table(whole.dir / "queries/queries.parquet")
    b = pq.read_table(split.dir / "queries/queries.parquet")
    assert a.num_rows > 500 and a.equals(b)


def test_rerun_skips_complete_and_changed_fingerprint_recomputes(tmp_path, multistream_dump):
    recipe = write_recipe(tmp_path, wikipedia=[str(multistream_dump)], partition_mb=PARTITION_MB,
                          min_count=50)
    run = Run(load_recipe(recipe))
    first = run_stage(QueriesStage(), run, LocalExecutor(1))
    assert first["ran"] == first["partitions"]
    again = run_stage(QueriesStage(), run, LocalExecutor(1))
    assert again["ran"] == 0 and again["skipped"] == first["partitions"]

    reduce_marker = run.marker_path("queries", "_reduce")
    before = reduce_marker.read_text()
    # A reduce setting changes: the counts are kept, the list is rebuilt.
    recipe.write_text(recipe.read_text().replace("min_count = 50", "min_count = 60"))
    run = Run(load_recipe(recipe))
    changed = run_stage(QueriesStage(), run, LocalExecutor(1))
    assert changed["ran"] == 0 and reduce_marker.read_text() != before
    # The input file changes: its partitions are recounted.
    os.utime(multistream_dump, ns=(time.time_ns(), time.time_ns()))
    assert run_stage(QueriesStage(), run, LocalExecutor(1))["ran"] == first["partitions"]
    # --force redoes everything.
    assert run_stage(QueriesStage(), run, LocalExecutor(1), force=True)["ran"] == first["partitions"]


@pytest.mark.slow
def test_sigkill_mid_stage_then_rerun_gives_identical_bytes(tmp_path, multistream_dump):
    kw = dict(wikipedia=[str(multistream_dump)], partition_mb=PARTITION_MB, min_count=50)
    clean = write_recipe(tmp_path, "clean", **kw)
    wit("run", clean)
    reference = outputs(tmp_path / "runs" / "clean")

    killed = write_recipe(tmp_path, "killed", **kw)
    state = tmp_path / "runs" / "killed" / "_state" / "queries"
    proc = subprocess.Popen([sys.executable, "-m", "wit_builder.cli", "run", str(killed)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(state.glob("*.json"))) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(state.glob("*.json")))
    assert 2 <= done < len(plan_parts(str(multistream_dump), int(PARTITION_MB * (1 << 20)))), \
        "the kill must land mid-stage"

    rerun = wit("run", killed)
    assert f"{done} already complete" in rerun.stderr
    got = outputs(tmp_path / "runs" / "killed")
    assert not [name for name in got if ".tmp-" in name]
    assert got == reference


@pytest.mark.slow
def test_ray_gives_byte_identical_outputs(tmp_path, multistream_dump):
    kw = dict(wikipedia=[str(multistream_dump)], partition_mb=PARTITION_MB, min_count=50)
    wit("run", write_recipe(tmp_path, "local", run={"workers": 2}, **kw))
    proc = wit("run", write_recipe(tmp_path, "ray", run={"workers": 2, "executor": "ray"}, **kw))
    assert "ray executor, 2 workers" in proc.stderr
    local, ray = outputs(tmp_path / "runs" / "local"), outputs(tmp_path / "runs" / "ray")
    assert len(local) > 10 and local == ray
