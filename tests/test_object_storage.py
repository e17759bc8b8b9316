"""Object storage over real HTTP: a local S3 server (moto's standalone server, in a process of its
own) and the same s3fs client code users run; nothing is mocked."""

from __future__ import annotations

import json

import fsspec
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import tomli_w

from conftest import REPO, needs_fashion, wit
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
