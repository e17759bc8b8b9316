"""Nothing lost silently: run-folder locking, strict recipes, early path checks, and a run that makes
no shards saying why."""

import json
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import tomli_w
from conftest import REPO, wit


def recipe_for(tmp_path, name="r", rows=(("http://127.0.0.1:9/a.jpg", "a photo"),), **sections):
    listing = tmp_path / f"{name}.csv"
    listing.write_text("url,caption\n" + "".join(f"{u},{c}\n" for u, c in rows))
    words = tmp_path / "words.txt"
    words.write_text("photo;1000\n")
    doc = {"run": {"name": name, "root": str(tmp_path / "runs"), "workers": 1},
           "queries": {"unigram_counts": str(words), "wordnet": ""},
           "candidates": {"inputs": [str(listing)]},
           "download": {"thread_count": 4, "timeout": 2, "deadline_s": 3, "retry_passes": 0}}
    for key, value in sections.items():
        doc.setdefault(key, {}).update(value)
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


@pytest.mark.slow
def test_a_run_that_makes_no_shards_fails_and_says_where_the_funnel_ran_dry(tmp_path):
    recipe = recipe_for(tmp_path, rows=[(f"http://127.0.0.1:9/{i}.jpg", f"a photo {i}") for i in range(30)])
    proc = wit("run", recipe, check=False)
    assert proc.returncode == 2
    assert "the run made no shards: all 30 downloads failed or were refused: loopback_address (30)" in proc.stderr
    assert "see download.allow_loopback" in proc.stderr and "done." not in proc.stderr
    # The funnel lists its steps in data-flow order.
    funnel = (REPO / "wit_builder/reports/01_funnel.sql").read_text()
    rows = [json.loads(line) for line in wit("sql", tmp_path / "runs" / "r", funnel, "--json").stdout.splitlines()]
    assert [r["step"] for r in rows] == ["candidates", "filter kept", "matched", "download refused", "sharded"]


def test_a_second_run_on_the_same_folder_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    recipe = recipe_for(tmp_path)
    run_dir = tmp_path / "runs" / "r"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom wit_builder.workspace import run_lock\n"
        f"with run_lock({str(run_dir)!r}):\n    print('held', flush=True)\n    time.sleep(120)")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    proc = wit("run", recipe, "--stage", "queries", check=False)
    assert proc.returncode == 2 and f"another wit run is using this run folder (pid {holder.pid} on" in proc.stderr
    assert not (run_dir / "queries").exists()
    holder.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel releases it
    holder.wait()
    assert "pid" in (run_dir / "_state" / "lock").read_text()
    wit("run", recipe, "--stage", "queries")
    assert (run_dir / "queries" / "queries.parquet").exists()


@pytest.mark.slow
def test_force_clears_a_partitions_work_folder(tmp_path):
    recipe = recipe_for(tmp_path)
    wit("run", recipe, "--stage", "queries", "--stage", "candidates", "--stage", "filter", "--stage", "match")
    work = tmp_path / "runs" / "r" / "download" / "_work" / "r.csv" / "pass-1" / "out"
    work.mkdir(parents=True)
    (work / "00000.parquet").write_bytes(b"half a file from a run that crashed")
    (work / "00000_stats.json").write_text("{}")  # img2dataset's sign that the shard is finished
    proc = wit("run", recipe, "--stage", "download", check=False)
    assert proc.returncode == 2  # the broken leftover is read
    wit("run", recipe, "--stage", "download", "--force")
    status = pq.read_table(tmp_path / "runs/r/download/part-r.csv.parquet").to_pylist()
    assert [(s["status"], s["reason"]) for s in status] == [("refused", "loopback_address")]
    assert not work.exists()


@pytest.mark.parametrize("section, key, value", [("download", "allow_loopback", "yes"),
                                                 ("download", "timeout", "10"),
                                                 ("run", "workers", 2.0),
                                                 ("balance", "t", "20000")])
def test_recipe_values_are_not_coerced(tmp_path, section, key, value):
    recipe = recipe_for(tmp_path, **{section: {key: value}})
    proc = wit("run", recipe, check=False)
    assert proc.returncode == 2 and f"{section}.{key}" in proc.stderr and "invalid recipe" in proc.stderr


def test_every_input_path_is_checked_before_any_stage_runs(tmp_path):
    recipe = recipe_for(tmp_path, dedup={"eval_sets": [{"name": "ev", "kind": "folder", "path": str(tmp_path / "nope")}]})
    text = recipe.read_text().replace(str(tmp_path / "r.csv"), str(tmp_path / "missing.csv"))
    recipe.write_text(text)
    proc = wit("run", recipe, check=False)
    assert proc.returncode == 2 and "inputs not found" in proc.stderr
    assert f"candidates.inputs: {tmp_path / 'missing.csv'}: file not found" in proc.stderr
    assert f"dedup.eval_sets ev: {tmp_path / 'nope'}: not found" in proc.stderr
    assert not (tmp_path / "runs" / "r" / "queries").exists()  # nothing ran
    # Only the stages asked for are checked.
    wit("run", recipe, "--stage", "queries")


def test_status_into_a_closed_pipe_is_not_an_error(tmp_path):
    recipe = recipe_for(tmp_path)
    wit("run", recipe, "--stage", "queries", "--stage", "candidates", "--stage", "filter")
    proc = subprocess.run(f"{sys.executable} -m wit_builder.cli status {tmp_path / 'runs' / 'r'} | head -1",
                          shell=True, cwd=REPO, capture_output=True, text=True)
    assert proc.stdout.startswith("run ") and "Error" not in proc.stderr and "Traceback" not in proc.stderr
