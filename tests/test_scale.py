"""Scale: bounded partitions, shuffles instead of gathers, and what each task costs.

The dedup, balance and shard tests run on bench/synthetic.py's download-stage output (real small
JPEGs, planted exact, near and same-URL copies), the same one bench/scale.py measures."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import tomli_w
from conftest import REPO, wit

from pipelines.candidates.lists import plan_input, read_list
from pipelines.dedup.neardup import brute_force_pairs
from pipelines.phash import phash_bytes
from wit_builder.runner import in_run

sys.path.insert(0, str(REPO / "bench"))
import synthetic  # noqa: E402

CORPUS_STAGES = ("--stage", "dedup", "--stage", "balance", "--stage", "shards")


# --- bounded partitions of one input --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
def test_text_lists_split_at_line_starts(tmp_path, kind):
    rng = np.random.default_rng(1)
    rows = [{"url": f"http://h/{i}.jpg", "caption": "x" * int(rng.integers(0, 40)) + (", quoted" if i % 7 else "")}
            for i in range(997)]
    path = tmp_path / f"list.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + ("\n\n" if i % 50 == 0 else "\n") for i, r in enumerate(rows)))
    else:
        pacsv.write_csv(pa.Table.from_pylist(rows), path, pacsv.WriteOptions(delimiter="\t" if kind == "tsv" else ","))
    data = path.read_bytes()
    whole, _ = read_list(str(path), kind, 0, None)
    for partition_rows in (1, 10, 333, 5000):
        ranges = plan_input(str(path), kind, partition_rows)
        got, origins = [], []
        for start, end in ranges:
            table, o = read_list(str(path), kind, start, end)
            got += table.to_pylist()
            origins += o
        assert got == whole.to_pylist() == rows, partition_rows
        expected = max(997 / partition_rows, 1)  # ranges are sized by bytes per line: roughly
        assert 0.7 * expected - 1 <= len(ranges) <= 1.3 * expected + 1
        # Every origin is the byte offset of its row's line.
        for row, origin in zip(rows[::97], origins[::97]):
            offset = int(origin.rsplit(":", 1)[1])
            assert data[offset:].split(b"\n", 1)[0].find(row["url"].encode()) >= 0


def test_parquet_lists_split_by_row_ranges(tmp_path):
    path = tmp_path / "list.parquet"
    table = pa.table({"url": [f"http://h/{i}.jpg" for i in range(1000)], "caption": [f"c {i}" for i in range(1000)]})
    pq.write_table(table, path, row_group_size=300)
    for partition_rows, expected in ((100, 10), (300, 4), (450, 3), (2000, 1)):
        ranges = plan_input(str(path), "parquet", partition_rows)
        assert len(ranges) == expected, (partition_rows, ranges)
        parts = [read_list(str(path), "parquet", a, b) for a, b in ranges]
        assert pa.concat_tables([t for t, _ in parts]).equals(table)
        assert [o for _, origins in parts for o in origins] == [f"list.parquet:{i}" for i in range(1000)]


@pytest.mark.slow
def test_one_big_csv_runs_as_several_partitions_in_parallel(tmp_path):
    listing = tmp_path / "big.csv"
    listing.write_text("url,caption\n" + "".join(f"http://img{i % 50}.example/{i}.jpg,a photo number {i}\n"
                                                  for i in range(50_000)))
    (tmp_path / "words.txt").write_text("photo;1000\n")
    recipe = tmp_path / "big.toml"
    recipe.write_text(tomli_w.dumps({
        "run": {"name": "big", "root": str(tmp_path / "runs"), "workers": 2},
        "queries": {"unigram_counts": str(tmp_path / "words.txt"), "wordnet": ""},
        "candidates": {"inputs": [str(listing)], "partition_rows": 10_000}}))
    proc = wit("run", recipe, "--stage", "candidates", "--stage", "filter")
    partitions = int(re.search(r"candidates: (\d+) partitions", proc.stderr).group(1))
    assert 4 <= partitions <= 6  # ~10k rows each, sized from the bytes per line
    run_dir = tmp_path / "runs" / "big"
    assert pq.read_table(run_dir / "candidates", columns=["uid"]).num_rows == 50_000
    markers = [json.loads(p.read_text()) for p in (run_dir / "_state" / "candidates").glob("big*.json")]
    assert len(markers) == partitions and len({m["cost"]["pid"] for m in markers}) == 2  # two workers
    spans = sorted((m["finished"] - m["cost"]["seconds"], m["finished"]) for m in markers)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "no two partitions ran at the same time"


def test_a_new_partitioning_leaves_no_stale_partition_files(tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("url,caption\n" + "".join(f"http://h.example/{i}.jpg,a photo {i}\n" for i in range(3000)))
    recipe = tmp_path / "p.toml"
    for partition_rows in (100_000, 500):
        recipe.write_text(tomli_w.dumps({
            "run": {"name": "p", "root": str(tmp_path / "runs"), "workers": 1},
            "queries": {"unigram_counts": str(listing), "wordnet": ""},
            "candidates": {"inputs": [str(listing)], "partition_rows": partition_rows}}))
        wit("run", recipe, "--stage", "candidates", "--stage", "filter")
    run_dir = tmp_path / "runs" / "p"
    for folder in ("candidates", "candidates/rejects", "filtered"):
        names = sorted(p.name for p in (run_dir / folder).glob("part-*.parquet"))
        assert len(names) >= 5 and all(n.startswith("part-list.csv-") for n in names), names
    counts = wit("sql", run_dir, "SELECT count(*) AS n FROM candidates", "--json").stdout
    assert json.loads(counts) == {"n": 3000}


def tiny_lists(folder: Path, m: int, rows: int) -> list[str]:
    """m lists of `rows` pairs each; the second half of the lists repeats the first half's pairs, so
    half the rows are copies another partition holds."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(m):
        path = folder / f"list{i:05d}.csv"
        first = (i % (m // 2)) * rows
        path.write_text("url,caption\n" + "".join(f"http://img.example/{first + j}.jpg,a photo of {first + j}\n"
                                                  for j in range(rows)))
        paths.append(str(path))
    return paths


@pytest.mark.slow
def test_candidate_and_filter_reads_follow_partitions_plus_buckets(tmp_path):
    """Many tiny partitions and many buckets: a step's read requests stay within 16 x (M + B) (they
    grew as M x B when every filter task opened every bucket's file), and no per-partition task reads
    more as M or B grow."""
    (tmp_path / "words.txt").write_text("photo;1000\n")
    rows, per_task = 4, {}
    for m, buckets in ((16, 4), (256, 4), (16, 64)):
        name = f"m{m}b{buckets}"
        recipe = tmp_path / f"{name}.toml"
        recipe.write_text(tomli_w.dumps({
            "run": {"name": name, "root": str(tmp_path / "runs"), "workers": 2},
            "queries": {"unigram_counts": str(tmp_path / "words.txt"), "wordnet": ""},
            "candidates": {"inputs": tiny_lists(tmp_path / name, m, rows), "buckets": buckets}}))
        wit("run", recipe, "--stage", "candidates", "--stage", "filter")
        run_dir = tmp_path / "runs" / name
        dropped = wit("sql", run_dir, "SELECT count(*) AS n FROM filtered WHERE reason = 'duplicate'", "--json").stdout
        assert json.loads(dropped) == {"n": m * rows // 2}
        for stage in ("candidates", "filter"):
            costs = task_costs(run_dir, stage)
            steps: dict[str, list[dict]] = {}
            for key, cost in costs.items():
                steps.setdefault(key.split("-")[0] if key.startswith("_") else "partition", []).append(cost)
            for step, tasks in steps.items():
                assert sum(c["read_requests"] for c in tasks) <= 16 * (m + buckets), (name, stage, step)
            per_task[name, stage] = max((c["files_read"], c["read_requests"]) for c in steps["partition"])
    assert len({per_task[name, "candidates"] for name in ("m16b4", "m256b4", "m16b64")}) == 1, per_task
    # A filter task: its candidates and the tracking file (a footer and a row group each), then at
    # most one span per copy it holds, however many partitions or buckets there are.
    for name in ("m16b4", "m256b4", "m16b64"):
        files, requests = per_task[name, "filter"]
        assert files <= 2 + rows and requests <= 4 + rows, per_task


def kill_at(recipe: Path, marker: Path, *stages: str) -> None:
    """Start `wit run`, SIGKILL it as soon as `marker` exists."""
    proc = subprocess.Popen([sys.executable, "-m", "wit_builder.cli", "run", str(recipe), *stages],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists(), f"the run ended before {marker.name}"


def children_of(pid: int) -> set[int]:
    """The live processes whose parent is pid (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.add(int(stat.parent.name))
    return found


def test_a_killed_driver_takes_its_workers_with_it(tmp_path):
    """kill -9 of `wit run` leaves no pool worker behind to finish a task into a run folder that a
    rerun now owns (or to idle on, holding its memory)."""
    recipe = synthetic_run(tmp_path, "killed", 20_000, 8, workers=2)
    proc = subprocess.Popen([sys.executable, "-m", "wit_builder.cli", "run", str(recipe), *CORPUS_STAGES],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 60, set()
    while time.time() < deadline and len(workers) < 2 and proc.poll() is None:
        workers = {c for c in children_of(proc.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()}
        time.sleep(0.01)
    assert len(workers) >= 2, "the run never started its workers"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(map(alive, workers)):
        time.sleep(0.05)
    assert not [w for w in workers if alive(w)]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_kill_during_the_candidate_duplicate_shuffle_then_rerun_gives_identical_bytes(tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("url,caption\n" + "".join(f"http://img.example/{i % 7000}.jpg,a photo {i % 14000}\n"
                                                  for i in range(20_000)))
    stages = ("--stage", "candidates", "--stage", "filter")
    outputs = {}
    for name, marker in (("clean", None), ("maps", "list.csv-00004.json"), ("buckets", "_bucket-00000.json")):
        recipe = tmp_path / f"{name}.toml"
        recipe.write_text(tomli_w.dumps({
            "run": {"name": name, "root": str(tmp_path / "runs"), "workers": 1},
            "queries": {"unigram_counts": str(listing), "wordnet": ""},
            "candidates": {"inputs": [str(listing)], "partition_rows": 2000, "buckets": 3,
                           "one_text_per_url": True}}))
        run_dir = tmp_path / "runs" / name
        if marker:
            kill_at(recipe, run_dir / "_state" / "candidates" / marker, *stages)
        wit("run", recipe, *stages)
        outputs[name] = {str(p.relative_to(run_dir)): p.read_bytes() for folder in ("candidates", "filtered")
                         for p in sorted((run_dir / folder).rglob("*.parquet"))}
    duplicates = pq.read_table(tmp_path / "runs/clean/candidates/duplicates")
    assert duplicates.num_rows > 10_000 and set(duplicates.column("reason").to_pylist()) == {"duplicate", "same_url"}
    assert outputs["clean"] == outputs["maps"] == outputs["buckets"]


# --- dedup, balance, shards on a synthetic corpus -------------------------------------------------


def synthetic_run(root: Path, name: str, n: int, partitions: int, workers: int = 1, run_extra: dict | None = None,
                  **settings) -> Path:
    recipe = {"run": {"name": name, "root": str(root), "workers": workers, **(run_extra or {})}, **settings}
    return synthetic.build(root, name, n, partitions, seed=3, recipe=recipe)


def corpus_outputs(run_dir: Path) -> dict[str, bytes]:
    """Every output byte of dedup, balance and shards, by relative path (markers and scratch aside)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for folder in ("dedup", "balanced", "shards")
            for p in sorted((run_dir / folder).rglob("*")) if p.is_file() and "_shuffle" not in p.parts}


def task_costs(run_dir: Path, stage: str) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text())["cost"] for p in (run_dir / "_state" / stage).glob("*.json")
            if p.name != "_manifest.json"}


@pytest.mark.slow
def test_the_same_corpus_as_4_and_as_64_partitions(tmp_path):
    """Identical corpus either way, and no task's reads grow with the number of partitions: a
    per-partition task opens the same files, a bucket task one file per map task, and no task reads
    more bytes than the biggest task of the 4-partition run (16 times as many, if reads grew with
    the partitions), give or take the headers of the bucket files."""
    settings = {"dedup": {"buckets": 3}, "shards": {"buckets": 2, "samples_per_shard": 500}}
    runs = {}
    for partitions in (4, 64):
        recipe = synthetic_run(tmp_path, f"p{partitions}", 8000, partitions, **settings)
        wit("run", recipe, *CORPUS_STAGES)
        runs[partitions] = tmp_path / f"p{partitions}"
    few, many = (corpus_outputs(runs[p]) for p in (4, 64))
    shards = sorted(k for k in few if k.endswith(".tar"))
    assert len(shards) > 4 and {k: few[k] for k in shards} == {k: many[k] for k in shards}
    assert few["shards/sizes.json"] == many["shards/sizes.json"]
    decisions = [pa.concat_tables(pq.read_table(f, columns=["uid", "keep", "dup_of", "reason", "distance"])
                                  for f in (runs[p] / "dedup").glob("part-*.parquet")).sort_by("uid") for p in (4, 64)]
    assert decisions[0].equals(decisions[1]) and 0 < pa.compute.sum(decisions[0]["keep"]).as_py() < 8000

    files_per_step, biggest_read = {}, 0
    for partitions, run_dir in runs.items():
        costs = {stage: task_costs(run_dir, stage) for stage in ("dedup", "balance", "shards")}
        # Per-partition tasks (dedup map and decide, balance, shard scatter): each opens a fixed few.
        steps = {}
        for stage, tasks in costs.items():
            for key, c in tasks.items():
                if not key.startswith("_"):
                    steps.setdefault((stage, key.endswith(".decide")), set()).add(c["files_read"])
        assert len(steps) == 4 and all(len(files) == 1 for files in steps.values()), steps
        files_per_step[partitions] = steps
        # A bucket task opens a map task's index and data file (of two kinds in dedup), whatever the
        # number of buckets or of chunks the map wrote.
        for stage, per_map in (("dedup", 4), ("shards", 2)):
            buckets = [c for key, c in costs[stage].items() if key.startswith("_bucket")]
            assert buckets and all(c["files_read"] <= per_map * partitions for c in buckets)
        reads = [c["bytes_read"] for tasks in costs.values() for c in tasks.values()]
        if partitions == 4:
            biggest_read = max(reads)
        else:
            assert max(reads) <= biggest_read * 1.05  # a bucket file's own header (~1 KB) aside
    assert files_per_step[4] == files_per_step[64]


def manifest_of(run_dir: Path, stage: str) -> dict:
    """A stage's manifest, its run files named by their paths (a manifest names them `$RUN/...`)."""
    return in_run(run_dir, json.loads((run_dir / "_state" / stage / "_manifest.json").read_text()))


def reference_dedup(run_dir: Path, radius: int, eval_hashes: np.ndarray) -> dict:
    """The obviously correct quadratic reference for every image's decision."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    manifest = manifest_of(run_dir, "download")
    rows = []
    for part, entry in enumerate(manifest["partitions"]):
        status = pq.read_table(entry["files"]["status"]).to_pylist()
        matched = {r["uid"]: r for r in pq.read_table(entry["files"]["matched"]).to_pylist()}
        rows += [{**r, "part": part, "url": matched[r["uid"]]["url"], "nq": len(matched[r["uid"]]["query_ids"])}
                 for r in status if r["status"] == "success"]
    n = len(rows)
    phash = np.array([r["phash"] for r in rows], np.uint64)
    pairs = set(brute_force_pairs(phash, radius))
    for column in ("sha256", "url"):
        first = {}
        for i, r in enumerate(rows):
            pairs.add((first.setdefault(r[column], i), i))
    a, b = zip(*pairs)
    comp = connected_components(coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False)[1]
    best = {}
    for i, r in enumerate(rows):
        key = (-r["nq"], -r["width"] * r["height"], r["uid"], r["part"])
        if comp[i] not in best or key < best[comp[i]][0]:
            best[comp[i]] = (key, i)
    out = {}
    for i, r in enumerate(rows):
        k = best[comp[i]][1]
        if k == i:
            decision = (True, None, None, 0)
        else:
            reason = ("exact_image" if r["sha256"] == rows[k]["sha256"] else
                      "same_url" if r["url"] == rows[k]["url"] else "near_duplicate")
            decision = (False, rows[k]["uid"], reason, int(np.bitwise_count(phash[i] ^ phash[k])))
        d = np.bitwise_count(eval_hashes ^ phash[i])
        if (d <= radius).any():
            e = int(np.lexsort((np.arange(len(d)), d))[0])
            decision = (False, f"eval:{e:03d}.jpg", "eval_overlap", int(d[e]))
        out[(r["part"], r["uid"])] = decision
    return out


def test_dedup_decisions_equal_a_brute_force_reference(tmp_path):
    """Planted exact, URL and near copies across partitions, identical pHash piles, and evaluation
    images; several buckets, so that groups span buckets and partitions."""
    evals = tmp_path / "eval"
    evals.mkdir()
    pictures = synthetic.jpeg_pool(np.random.default_rng(9), 4)
    for i, data in enumerate(pictures):
        (evals / f"{i:03d}.jpg").write_bytes(data)
    eval_hashes, _ = phash_bytes(pictures)
    recipe = synthetic_run(tmp_path, "bf", 3000, 5, dedup={
        "buckets": 3, "radius": 4, "eval_sets": [{"name": "eval", "kind": "folder", "path": str(evals)}]})
    run_dir = tmp_path / "bf"
    # Plant evaluation overlaps (at 0 to 3 bits) and a pile of identical hashes in the corpus.
    status_path = manifest_of(run_dir, "download")["partitions"][2]["files"]["status"]
    status = pq.read_table(status_path)
    ph = status.column("phash").to_numpy().copy()
    for i, h in enumerate(eval_hashes):
        ph[i] = h ^ np.uint64((1 << i) - 1)
    ph[10:40] = ph[10]
    pq.write_table(status.set_column(status.schema.get_field_index("phash"), "phash", pa.array(ph, pa.uint64())),
                   status_path)
    wit("run", recipe, "--stage", "dedup")
    expected = reference_dedup(run_dir, 4, eval_hashes)
    manifest = manifest_of(run_dir, "dedup")
    got = {(part, r["uid"]): (r["keep"], r["dup_of"], r["reason"], r["distance"])
           for part, entry in enumerate(manifest["partitions"])
           for r in pq.read_table(entry["files"]["dedup"]).to_pylist()}
    assert got == expected
    reasons = {d[2] for d in got.values()}
    assert reasons == {None, "exact_image", "same_url", "near_duplicate", "eval_overlap"}


def worker_tasks(raylet: int) -> set[int]:
    """The Ray worker processes under `raylet` that are running one of wit's tasks now."""
    return {c for c in children_of(raylet) if b"execute_in" in Path(f"/proc/{c}/cmdline").read_bytes()}


@pytest.mark.slow
def test_ray_survives_a_lost_node_and_gives_the_same_corpus_as_the_local_pool(tmp_path):
    """Two Ray nodes; the worker node is killed (no graceful exit) while one of its tasks runs. The
    lost task runs again on the node that is left, and the corpus equals the local pool's, byte for
    byte."""
    from ray.cluster_utils import Cluster

    settings = {"dedup": {"buckets": 2}, "shards": {"buckets": 2, "samples_per_shard": 300}}
    recipe = synthetic_run(tmp_path, "local", 6000, 6, workers=2, **settings)
    wit("run", recipe, *CORPUS_STAGES)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        node = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        raylet = node.all_processes["raylet"][0].process.pid
        run = {"executor": "ray", "ray_address": cluster.address}
        recipe = synthetic_run(tmp_path, "ray", 6000, 6, workers=2, **settings, run_extra=run)
        proc = subprocess.Popen([sys.executable, "-m", "wit_builder.cli", "run", str(recipe), *CORPUS_STAGES],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        deadline = time.time() + 120
        while time.time() < deadline and not worker_tasks(raylet) and proc.poll() is None:
            time.sleep(0.005)
        assert worker_tasks(raylet), "no task ever ran on the worker node"
        cluster.remove_node(node, allow_graceful=False)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, stderr[-3000:]
    assert "lost with its worker or node" in stderr and "ray executor, 2 workers" in stderr
    outputs = {}
    for name in ("local", "ray"):
        outputs[name] = corpus_outputs(tmp_path / name)
        wids = json.loads(outputs[name].pop("shards/wids.json"))
        assert wids.pop("name") == name  # the run's name; the rest must be equal
        outputs[name]["wids"] = wids
    assert len(outputs["local"]) > 20 and outputs["local"] == outputs["ray"]


KILL_POINTS = [  # (stage, marker that must exist first, description)
    ("dedup", "synthetic-00002.json", "dedup maps"),
    ("dedup", "_bucket-00000.json", "dedup buckets"),
    ("dedup", "synthetic-00001.decide.json", "dedup decisions written back"),
    ("shards", "synthetic-00002.json", "shard scatter"),
    ("shards", "_bucket-00000.json", "shard buckets"),
]


@pytest.mark.slow
def test_kill_during_each_shuffle_step_then_rerun_gives_identical_bytes(tmp_path):
    settings = {"dedup": {"buckets": 3}, "shards": {"buckets": 3, "samples_per_shard": 400}}
    recipe = synthetic_run(tmp_path, "clean", 20_000, 8, **settings)
    pristine = tmp_path / "pristine"
    shutil.copytree(tmp_path / "clean", pristine)
    wit("run", recipe, *CORPUS_STAGES)
    reference = corpus_outputs(tmp_path / "clean")
    for stage, marker, where in KILL_POINTS:
        shutil.rmtree(tmp_path / "clean")
        shutil.copytree(pristine, tmp_path / "clean")
        kill_at(recipe, tmp_path / "clean" / "_state" / stage / marker, *CORPUS_STAGES)
        assert not (tmp_path / "clean/_state/shards/_manifest.json").exists(), where
        wit("run", recipe, *CORPUS_STAGES)
        got = corpus_outputs(tmp_path / "clean")
        assert got == reference, where
        assert not list((tmp_path / "clean").rglob(".*.tmp-*")) and not (tmp_path / "clean/dedup/_shuffle").exists()


@pytest.mark.slow
def test_dedup_balance_shards_run_under_an_address_space_limit(tmp_path):
    """400k pairs under a hard 1.25 GB address-space limit (RLIMIT_AS): every task holds one partition
    or one bucket, so the limit holds however big the corpus, given buckets sized to it. The same
    corpus in one bucket, which is what a gathering step holds, exceeds the same limit."""
    limit = 1250 << 20
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_ARENA_MAX": "2"}

    def run_limited(name: str, buckets: int) -> subprocess.CompletedProcess:
        recipe = synthetic_run(tmp_path, name, 400_000, 8, dedup={"buckets": buckets}, shards={"buckets": buckets})
        code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))\n"
                "from wit_builder.cli import main\n"
                f"sys.exit(main(['run', {str(recipe)!r}, *{list(CORPUS_STAGES)!r}]))")
        return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)

    proc = run_limited("buckets", 8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sizes = json.loads((tmp_path / "buckets/shards/sizes.json").read_text())
    kept = pq.read_table(tmp_path / "buckets/balanced", columns=["keep"]).column("keep")
    assert sum(sizes.values()) == pa.compute.sum(kept).as_py() > 100_000
    shutil.rmtree(tmp_path / "buckets")
    proc = run_limited("gathered", 1)
    assert proc.returncode != 0 and "_bucket-00000" in proc.stderr
    assert "alloc" in proc.stderr.lower() or "MemoryError" in proc.stderr


def test_counts_are_summed_as_a_tree_of_bounded_tasks(tmp_path):
    """Per-partition counts summed over at most fan_in files per task, level by level: the same
    totals as one sum over every file, and no task reads more than fan_in files."""
    from conftest import write_recipe

    from pipelines.match.stage import MatchStage
    from pipelines.sampling import sum_counts_steps
    from wit_builder.recipe import load_recipe
    from wit_builder.runner import execute
    from wit_builder.workspace import Run

    (tmp_path / "words.txt").write_text("dog;1000\n")
    run = Run(load_recipe(write_recipe(tmp_path, unigram_counts=str(tmp_path / "words.txt"))))
    stage, rng, parts = MatchStage(), np.random.default_rng(5), []
    for i in range(7):
        path = tmp_path / f"counts-{i}.parquet"
        ids = np.unique(rng.integers(0, 50, 30)).astype(np.int32)
        pq.write_table(pa.table({"query_id": ids, "count": rng.integers(1, 9, len(ids))}), path)
        parts.append(stage.task(run, f"p{i}", execute, kwargs={"outputs": {"counts": str(path)}}, outputs=[str(path)]))
    expected = pa.concat_tables(pq.read_table(t.outputs[0]) for t in parts).group_by("query_id").aggregate(
        [("count", "sum")]).sort_by("query_id")
    steps, levels = sum_counts_steps(stage, run, parts, str(tmp_path / "total.parquet"), fan_in=2), []
    with contextlib.suppress(StopIteration):
        tasks = next(steps)
        while True:
            levels.append([execute(t)["cost"]["files_read"] for t in tasks])
            tasks = steps.send(None)
    assert [len(level) for level in levels] == [4, 2, 1] and max(max(level) for level in levels) <= 2
    total = pq.read_table(tmp_path / "total.parquet")
    assert total.column("query_id").to_pylist() == expected.column("query_id").to_pylist()
    assert total.column("count").to_pylist() == expected.column("count_sum").to_pylist()
