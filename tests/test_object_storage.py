"""Object storage over real HTTP: a local S3 server (moto's standalone server, in a process of its
own) and the same s3fs client code users run; nothing is mocked."""

from __future__ import annotations

import json
import re

import fsspec
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import tomli_w
from conftest import REPO, needs_fashion, needs_wordnet, wit

from trainer import data, fashion
from wit_builder.errors import WitError
from wit_builder.storage import LocalS3, forget_clients, identity

WEB_INPUTS = [REPO / "data/warc" / n for n in ("aut-example-2008.warc.gz", "cc-main-2020-34-sample.warc.gz",
                                               "cc-main-2024-22-whirlwind.warc.gz",
                                               "cc-main-2024-22-whirlwind.warc.wat.gz")]


@pytest.fixture(scope="module")
def s3():
    with LocalS3() as server:
        yield server


@pytest.fixture(scope="module")
def shards(s3, tmp_path_factory):
    """1,000 Fashion-MNIST training and 1,000 test samples in shards of 250, on disk and in S3."""
    local = tmp_path_factory.mktemp("fashion")
    fashion.build(local, per_shard=250, limit=1000)
    url = s3.bucket("wit-shards") + "/fashion"
    fsspec.filesystem("s3").put(f"{local}/", url + "/", recursive=True)
    return local, url


def labels(stream: data.ShardStream) -> list[int]:
    return [int(x) for batch in stream for x in batch["labels"]]


@needs_fashion
def test_shards_in_s3_stream_like_local_ones(shards, monkeypatch):
    local, url = shards
    expected = labels(data.ShardStream(data.sources([str(local / "test-*.tar")]), None, 28, 64, labels="cls"))
    assert len(expected) == 1000
    for spec in (f"{url}/test-*.tar", f"{url}/test-00000{{0..3}}.tar"):
        assert data.expand(spec) == [f"{url}/test-00000{i}.tar" for i in range(4)]
        assert labels(data.ShardStream(data.sources([spec]), None, 28, 64, labels="cls")) == expected
    assert len(data.expand(url)) == 8  # a prefix: every shard under it, train and test
    # Two ranks of two loader workers: each reads its own shards from the store, every sample once.
    seen = []
    for rank in range(2):
        for worker in range(2):
            for k, v in {"RANK": rank, "WORLD_SIZE": 2, "WORKER": worker, "NUM_WORKERS": 2}.items():
                monkeypatch.setenv(k, str(v))
            seen += labels(data.ShardStream(data.sources([f"{url}/test-*.tar"]), None, 28, 64, labels="cls"))
    assert sorted(seen) == sorted(expected)


@needs_fashion
def test_an_objects_identity_is_its_etag_and_size(shards):
    _, url = shards
    one, again = identity(f"{url}/test-000000.tar"), identity(f"{url}/test-000000.tar")
    assert one == again and one["size"] > 0 and len(one["etag"].strip('"')) == 32
    assert identity(f"{url}/test-000001.tar")["etag"] != one["etag"]


@pytest.mark.slow
@needs_fashion
def test_train_and_eval_straight_from_s3(shards, tmp_path):
    _, url = shards
    out = tmp_path / "run"
    wit("train", "--data", f"{url}/train-*.tar", "--output", out, "--steps", "6", "--batch-size", "64",
        "--workers", "2", "--warmup", "2", "--save-every", "6", "--log-every", "1", "--shuffle-buffer", "100")
    assert (out / "checkpoints" / "step_00000006.pt").exists()
    proc = wit("eval", "--data", f"{url}/test-*.tar", "--checkpoint", out, "--json")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["images"] == 1000  # classnames.txt read from beside the shards, in the bucket


@needs_fashion
def test_store_problems_are_one_clear_error_naming_the_url(shards, monkeypatch):
    _, url = shards
    with pytest.raises(WitError, match=r"^s3://no-such-bucket/x/: not found: no such bucket"):
        data.expand("s3://no-such-bucket/x/")
    with pytest.raises(WitError, match=rf"^{url}/nothing-\*\.tar: no \.tar objects here"):
        data.expand(f"{url}/nothing-*.tar")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    forget_clients()
    with pytest.raises(WitError, match=rf"^{url}/train-\*\.tar: no credentials: set AWS_ACCESS_KEY_ID"):
        data.expand(f"{url}/train-*.tar")
    monkeypatch.undo()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    forget_clients()
    with pytest.raises(WitError, match=rf"^{url}/train-\*\.tar: cannot reach the store's endpoint"):
        data.expand(f"{url}/train-*.tar")
    monkeypatch.undo()
    forget_clients()
    assert len(data.expand(f"{url}/train-*.tar")) == 4  # and with the right settings, it reads again


def test_candidates_read_from_s3_equal_those_read_from_disk(s3, tmp_path):
    """WARC, WAT, a CSV split into byte ranges and a parquet list split into row ranges, read
    straight from the bucket: the same candidates and rejects as from local files, and a second run
    finds the stage complete by the objects' ETags."""
    pacsv.write_csv(pacsv.read_csv(REPO / "pipelines/demo/faults.csv"), tmp_path / "faults.csv")
    pq.write_table(pacsv.read_csv(tmp_path / "faults.csv"), tmp_path / "faults.parquet", row_group_size=4)
    local = [*map(str, WEB_INPUTS), str(tmp_path / "faults.csv"), str(tmp_path / "faults.parquet")]
    bucket = s3.bucket("wit-inputs")
    remote = [f"{bucket}/crawl/{p.rsplit('/', 1)[1]}" for p in local]
    for a, b in zip(local, remote):
        fsspec.filesystem("s3").put_file(a, b)

    def run(name: str, inputs: list[str], check: bool = True):
        recipe = tmp_path / f"{name}.toml"
        recipe.write_text(tomli_w.dumps({"run": {"name": name, "root": str(tmp_path / "runs"), "workers": 2},
                                         "candidates": {"inputs": inputs, "partition_rows": 10}}))
        return wit("run", recipe, "--stage", "candidates", check=check)

    run("local", local)
    run("s3", [*remote[:4], f"{bucket}/crawl/faults.*"])  # a glob in the bucket too
    def rows(name: str, folder: str) -> list[dict]:
        parts = sorted((tmp_path / "runs" / name / folder).glob("part-*.parquet"))
        return [r for p in parts for r in pq.read_table(p).to_pylist()]

    for folder in ("candidates", "candidates/rejects"):
        assert rows("s3", folder) == rows("local", folder) and rows("local", folder)
    assert len(list((tmp_path / "runs/s3/candidates").glob("part-faults.*-0000[0-9].parquet"))) == 6  # in ranges
    again = run("s3", [*remote[:4], f"{bucket}/crawl/faults.*"])
    assert "candidates: complete" in again.stdout + again.stderr  # nothing read again
    for inputs, error in ((["s3://no-such-bucket/crawl.warc.gz"], "s3://no-such-bucket/crawl.warc.gz: object not found"),
                          ([f"{bucket}/crawl/nothing-*.csv"], f"no file matches '{bucket}/crawl/nothing-*.csv'")):
        wrong = run("wrong", inputs, check=False)
        assert wrong.returncode == 2 and error in wrong.stderr, wrong.stderr


def test_a_multistream_dump_in_s3_splits_and_reads_like_the_local_one(s3, multistream_dump):
    """The index beside the dump is found in the bucket, the byte ranges are the same, and each range
    yields the same pages, read with ranged requests."""
    from queries.dump import iter_page_bytes, plan_parts, read_site

    bucket = s3.bucket("wit-dumps")
    index = multistream_dump.with_name("enwiki-sample-multistream-index.txt.bz2")
    for f in (multistream_dump, index):
        fsspec.filesystem("s3").put_file(str(f), f"{bucket}/{f.name}")
    url = f"{bucket}/{multistream_dump.name}"
    local_parts, remote_parts = plan_parts(str(multistream_dump), 50_000), plan_parts(url, 50_000)
    assert len(local_parts) > 2
    assert [(p.start, p.end, p.key) for p in remote_parts] == [(p.start, p.end, p.key) for p in local_parts]
    for a, b in zip(local_parts, remote_parts):
        assert list(iter_page_bytes(b)) == list(iter_page_bytes(a))
    remote, local = read_site(url), read_site(str(multistream_dump))
    assert (remote.lang, remote.namespaces) == (local.lang, local.namespaces) and len(local.namespaces) > 10


@pytest.fixture(scope="module")
def corpus_recipes(s3, tmp_path_factory):
    """A small run through every stage on the miniature web, as two recipes: one with its run folder
    on disk, one with it in the bucket (and its staging folder of its own)."""
    from test_download import ARCHIVE, archive_images, make_run

    tmp = tmp_path_factory.mktemp("corpus-s3")
    rows = [(u, f"a picture {i}") for i, u in enumerate(archive_images(20))]
    rows += [(archive_images(1)[0], "a picture again")]  # an exact duplicate for dedup
    local, run_dir = make_run(tmp, "corpus", rows, {"replay": [str(ARCHIVE)], "allow_loopback": True},
                              workers=2, words=("a", "picture", "again"))
    local.write_text(local.read_text() + "\n[balance]\nt = 5\noversample = 0\n[shards]\nsamples_per_shard = 4\n")
    in_s3 = tmp / "in-s3.toml"
    bucket = s3.bucket("wit-runs")
    in_s3.write_text(local.read_text().replace(f'root = "{tmp / "runs"}"',
                                               f'root = "{bucket}/runs"\nstaging = "{tmp / "staging"}"'))
    wit("run", local)
    return run_dir, in_s3, f"{bucket}/runs/corpus", tmp / "staging"


def store_files(url: str) -> dict[str, bytes]:
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    prefix = url.removeprefix("s3://") + "/"
    return {p.removeprefix(prefix): fs.cat_file(p) for p in fs.find(prefix)}


@pytest.mark.slow
def test_a_run_in_s3_gives_the_local_runs_shards_byte_for_byte(corpus_recipes):
    run_dir, recipe, url, staging = corpus_recipes
    done = wit("run", recipe).stderr
    assert f"run corpus -> {url}" in done and f"wit sql {url}" in done
    stored = store_files(url)
    shards = sorted(p for p in stored if p.startswith("shards/") and "/_" not in p)
    assert "shards/000000.tar" in shards and {"shards/sizes.json", "shards/shards.parquet"} <= set(shards)
    for name in shards:
        assert stored[name] == (run_dir / name).read_bytes(), name
    # Every run file went to the store; the node keeps only its lock, log and caches.
    left = {p.name for p in staging.rglob("*") if p.is_file()}
    assert left and left <= {"lock", "wit.log"} | {p.name for p in staging.rglob("_robots/*/*")}, left
    again = wit("run", recipe).stderr
    assert "shards: complete" in again and "dedup: complete" in again
    # Carried on from another machine (another staging folder), or by its URL: nothing to redo.
    elsewhere = recipe.with_name("elsewhere.toml")
    elsewhere.write_text(recipe.read_text().replace(str(staging), str(staging.parent / "other-machine")))
    for rerun in (wit("run", elsewhere).stderr, wit("run", url).stderr):
        assert "shards: complete" in rerun and set(re.findall(r"(\d+) to run", rerun)) <= {"0"}, rerun
    # The run folder in the bucket is a run: wit sql, status, stats and report read it there.
    ours = json.loads(wit("sql", url, "SELECT count(*) AS n, sum(len(query_ids)) AS q FROM shards", "--json").stdout)
    theirs = json.loads(wit("sql", run_dir, "SELECT count(*) AS n, sum(len(query_ids)) AS q FROM shards", "--json").stdout)
    assert ours == theirs and ours["n"] > 4
    assert "shards       complete: 1 partitions" in wit("status", url).stdout
    stats = wit("stats", url).stdout
    assert "== The funnel" in stats and "not available yet" not in stats.split("== Query coverage")[0]
    assert f"report: {url}/report.html" in wit("report", url).stdout
    assert b"<img class=\"thumb\"" in store_files(url)["report.html"]


@pytest.mark.slow
def test_killed_mid_run_in_s3_then_rerun_gives_the_same_shards(corpus_recipes, tmp_path):
    """kill -9 the driver (its workers die with it) as soon as the download's marker is in the
    bucket; the rerun trusts only markers, redoes the rest, and ends with the local run's shards."""
    import signal
    import subprocess
    import sys
    import time

    run_dir, recipe, _, _ = corpus_recipes
    url = recipe.read_text().split('root = "', 1)[1].split('"', 1)[0].replace("/runs", "/killed")
    killed = tmp_path / "killed.toml"
    killed.write_text(recipe.read_text().replace("/runs\"", "/killed\""))
    marker = url.removeprefix("s3://") + "/corpus/_state/download/corpus.csv.json"
    fs = fsspec.filesystem("s3")
    proc = subprocess.Popen([sys.executable, "-m", "wit_builder.cli", "run", str(killed)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not fs.exists(marker):
        fs.invalidate_cache()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert fs.exists(marker) and "shards/sizes.json" not in store_files(url + "/corpus")
    rerun = wit("run", killed).stderr
    assert "download: 1 partitions, 1 already complete, 0 to run" in rerun
    stored = store_files(url + "/corpus")
    for name in ("shards/000000.tar", "shards/sizes.json", "shards/shards.parquet"):
        assert stored[name] == (run_dir / name).read_bytes(), name


def test_pageview_files_read_from_s3_like_local_ones(s3, tmp_path):
    import gzip

    from queries.tables import read_pageviews

    local = tmp_path / "pageviews-20240101-000000.gz"
    local.write_bytes(gzip.compress(b"en Cat 10 0\nen Dog 3 0\nde Cat 99 0\nen.m Cat 5 0\nen Bad_line\n"))
    url = s3.bucket("wit-pageviews") + "/" + local.name
    fsspec.filesystem("s3").put_file(str(local), url)
    views = read_pageviews([url], ["en", "en.m"])
    assert views == read_pageviews([str(local)], ["en", "en.m"]) == {"Cat": 15, "Dog": 3}
    with pytest.raises(WitError, match="pageview file not found"):
        read_pageviews([url + ".missing"], ["en"])


@pytest.mark.slow
def test_a_two_node_ray_cluster_on_a_run_in_s3_gives_the_same_shards(corpus_recipes, tmp_path, monkeypatch):
    """Two Ray nodes (separate raylets), the run folder in the bucket: every file a task reads comes
    from the store, and the shards equal the local process pool's on disk."""
    from ray.cluster_utils import Cluster

    run_dir, recipe, _, staging = corpus_recipes
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        on_ray = tmp_path / "ray.toml"
        on_ray.write_text(recipe.read_text().replace("/runs\"", "/ray\"").replace(
            "workers = 2", f'workers = 2\nexecutor = "ray"\nray_address = "{cluster.address}"'))
        url = on_ray.read_text().split('root = "', 1)[1].split('"', 1)[0] + "/corpus"
        assert "ray executor, 2 workers" in wit("run", on_ray).stderr
    finally:
        cluster.shutdown()
    stored = store_files(url)
    for name in ("shards/000000.tar", "shards/sizes.json", "shards/shards.parquet"):
        assert stored[name] == (run_dir / name).read_bytes(), name
    assert not [p for p in staging.rglob("*.parquet")], "a run file stayed on a node"


def test_a_run_root_in_a_store_that_fails_is_one_clear_error(s3, tmp_path, monkeypatch):
    """A wrong bucket, no credentials, an unreachable endpoint: one line naming the URL, for `wit run`
    and for the commands that read a run by its URL."""
    (tmp_path / "words.txt").write_text("a;1000\n")
    recipe = tmp_path / "r.toml"
    recipe.write_text(tomli_w.dumps({"run": {"name": "t", "root": "s3://no-such-bucket/runs",
                                             "staging": str(tmp_path / "staging")},
                                     "queries": {"unigram_counts": str(tmp_path / "words.txt"), "wordnet": ""}}))
    url = "s3://no-such-bucket/runs/t"
    cases = [({}, "not found: no such bucket"),
             ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
               "AWS_CONFIG_FILE": "/nonexistent"}, "no credentials: set AWS_ACCESS_KEY_ID"),
             ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"}, "cannot reach the store's endpoint")]
    for env, error in cases:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.delenv(k) if v is None else m.setenv(k, v)
            ran = wit("run", recipe, check=False)
            assert ran.returncode == 2 and f"error: {url}/recipe.toml: {error}" in ran.stderr, ran.stderr
            if env:
                asked = wit("sql", url, "SELECT 1", check=False)
                assert asked.returncode == 2 and f"error: {url}/recipe.toml: {error}" in asked.stderr, asked.stderr
    asked = wit("sql", url, "SELECT 1", check=False)
    assert asked.returncode == 2 and f"error: {url}: no run here" in asked.stderr


@pytest.mark.slow
@needs_fashion
def test_tables_eval_sets_and_replay_warcs_read_from_s3_like_local_ones(s3, tmp_path):
    """The remaining recipe inputs: a unigram count table, evaluation sets (an image folder,
    WebDataset tars, Fashion-MNIST's files) and the replay WARCs, each read from a bucket give what
    the same files on disk give."""
    import gzip
    import tarfile

    from conftest import FASHION

    from pipelines.dedup.stage import eval_hashes
    from pipelines.download.miniweb import load_captures
    from queries.tables import read_unigram_table

    fs = fsspec.filesystem("s3")
    bucket = s3.bucket("wit-more-inputs")
    table = tmp_path / "counts.txt.gz"
    table.write_bytes(gzip.compress(b"cat;500\ndog\t300\nr&amp;b;200\nbroken line\n"))
    fs.put_file(str(table), f"{bucket}/counts.txt.gz")
    assert read_unigram_table(f"{bucket}/counts.txt.gz") == read_unigram_table(table) == {"cat": 500, "dog": 300, "r&b": 200}

    folder = tmp_path / "eval" / "photos"
    (folder / "sub").mkdir(parents=True)
    fashion.build(tmp_path / "wds", per_shard=50, limit=100)
    tars = sorted((tmp_path / "wds").glob("test-*.tar"))
    with tarfile.open(tars[0]) as tf:
        images = [tf.extractfile(m).read() for m in tf if m.name.endswith(".png")][:3]
    for i, image in enumerate(images):
        (folder / ("sub" if i else "") / f"{i}.png").write_bytes(image)
    fs.put(f"{folder}/", f"{bucket}/photos/", recursive=True)
    for t in (tmp_path / "wds").glob("*.tar"):
        fs.put_file(str(t), f"{bucket}/wds/{t.name}")
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        fs.put_file(str(FASHION / name), f"{bucket}/fashion/{name}")
    for kind, local, url in (("folder", folder, f"{bucket}/photos"), ("webdataset", tmp_path / "wds", f"{bucket}/wds"),
                             ("fashion-mnist", FASHION, f"{bucket}/fashion")):
        (h1, ids1), (h2, ids2) = eval_hashes(kind, str(local)), eval_hashes(kind, url)
        assert list(h1) == list(h2) and ids1 == ids2 and len(ids1) >= 3, kind
    assert eval_hashes("folder", f"{bucket}/photos")[1] == ["0.png", "sub/1.png", "sub/2.png"]

    warc = REPO / "data/warc/aut-example-2008.warc.gz"
    fs.put_file(str(warc), f"{bucket}/{warc.name}")
    captures = load_captures([f"{bucket}/{warc.name}"])
    assert captures == load_captures([str(warc)]) and len(captures) > 100


def test_a_shuffle_in_s3_reads_each_bucket_like_on_disk(s3, tmp_path, monkeypatch):
    """Map files uploaded to the store, their outputs tracked, then each bucket read back by ranged
    GETs: the same records as on disk, including a map that had no rows (no span at all)."""
    import numpy as np
    import pyarrow as pa

    from wit_builder import shuffle, workspace

    monkeypatch.setattr(workspace, "_stores", {})
    schema = pa.schema([("key", pa.int64()), ("text", pa.string())])
    maps = {"000000": pa.table({"key": np.arange(100), "text": [f"t{i}" for i in range(100)]}, schema=schema),
            "000001": None,  # a map that wrote nothing (no chunk at all)
            "000002": pa.table({"key": np.arange(100, 130), "text": ["x"] * 30}, schema=schema)}
    staging = tmp_path / "staging"
    workspace.use_store(staging, s3.bucket("wit-shuffle") + "/run")
    for folder in (tmp_path / "local", staging / "shuffle"):
        for name, table in maps.items():
            with shuffle.bucket_writer(folder, name, 4, compression="lz4") as write:
                if table is not None:
                    write(table, table.column("key").to_numpy() % 4)
        shuffle.track_outputs(str(folder), [("{:06d}", len(maps))])
    assert not list(staging.rglob("*.arrow"))  # uploaded, not kept
    for b in range(4):
        ours, theirs = shuffle.read_bucket(staging / "shuffle", b, schema), shuffle.read_bucket(tmp_path / "local", b, schema)
        assert ours.equals(theirs) and ours.num_rows == (33 if b < 2 else 32)


@pytest.mark.slow
@needs_wordnet
@needs_fashion
@pytest.mark.skipif(not (REPO / "runs/stamps/stamps.warc.gz").exists(), reason="the stamps are made by make setup")
def test_the_demo_with_its_run_folder_in_s3_gives_the_same_shards(s3, tmp_path):
    """`pipelines/recipes/demo.toml` end to end, once on disk and once with `run.root` in the bucket: every
    shard, sizes.json, wids.json and shards.parquet byte for byte."""
    import tomllib

    from wit_builder.recipe import load_recipe

    resolved = tomllib.loads(load_recipe(REPO / "pipelines/recipes/demo.toml").resolved_toml())  # absolute inputs
    bucket = s3.bucket("wit-demo")
    for name, run in (("local", {"root": str(tmp_path / "runs")}),
                      ("in-s3", {"root": f"{bucket}/runs", "staging": str(tmp_path / "staging")})):
        (tmp_path / f"{name}.toml").write_text(tomli_w.dumps({**resolved, "run": {**resolved["run"], **run}}))
        wit("run", tmp_path / f"{name}.toml")
    stored = {k: v for k, v in store_files(f"{bucket}/runs/demo").items() if k.startswith("shards/") and "/_" not in k}
    local = {f"shards/{p.name}": p.read_bytes() for p in (tmp_path / "runs/demo/shards").iterdir() if p.is_file()}
    assert len(local) > 40 and {"shards/sizes.json", "shards/shards.parquet"} <= set(local)
    assert stored.keys() == local.keys() and all(stored[k] == local[k] for k in local)
