"""The shards' `.json` member, built for a whole chunk at once (pipelines/shard.py scatter_part): each
record parses to exactly the sample's metadata, tricky text included, with sorted keys and UTF-8 text."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipelines import shard
from wit_builder.shuffle import read_bucket, track_outputs
from wit_builder.workspace import write_parquet

QUERIES = ["cat", "dög", 'say "hi"', "back\\slash", "日本"]
TRICKY = 'quote " backslash \\ newline \n tab \t nul \x00 bell \x07 del \x7f sep \u2028 é 日本 😀 </script> /'
ROWS = [  # uid, url, page_url, text, query_ids, width, height, phash, origin, keep
    ("0000000000000001", "http://a.example/x.jpg?q=\"1\"&b=\\2", None, "a cat", [0, 1], 10, 20, 0,
     "cc:1", True),
    ("fedcba9876543210", "http://b.example/ünï/😀.jpg", "http://b.example/页面\n", TRICKY, [], None, 7,
     2**64 - 1, TRICKY, True),
    ("00000000000000ff", "http://c.example/c.png", "", "", [2, 3, 4, 2], 1, 1, 0x00ab_cdef_0123_4567,
     "", True),
    ("1111111111111111", "http://d.example/dropped.jpg", None, "dropped", [0], 5, 5, 1, "cc:4", False),
]


def write_inputs(tmp_path, rows=ROWS, images_for=None):
    cols = list(zip(*rows))
    balanced = tmp_path / "balanced.parquet"
    write_parquet(pa.table({
        "uid": pa.array(cols[0], pa.string()), "query_ids": pa.array(cols[4], pa.list_(pa.int32())),
        "keep": pa.array(cols[9], pa.bool_()), "url": pa.array(cols[1], pa.string()),
        "page_url": pa.array(cols[2], pa.string()), "text": pa.array(cols[3], pa.string()),
        "width": pa.array(cols[5], pa.int32()), "height": pa.array(cols[6], pa.int32()),
        "sha256": pa.array([u * 4 for u in cols[0]], pa.string()), "phash": pa.array(cols[7], pa.uint64()),
        "origin": pa.array(cols[8], pa.string()), "bytes": pa.array([3] * len(rows), pa.int64())}), balanced)
    images = tmp_path / "images.parquet"
    uids = [r[0] for r in rows] + ["2222222222222222"] if images_for is None else images_for  # one not in balanced
    write_parquet(pa.table({"uid": pa.array(uids, pa.string()),
                            "image": pa.array([u.encode()[:3] for u in uids], pa.binary())}), images)
    queries = tmp_path / "queries.parquet"
    write_parquet(pa.table({"query_id": pa.array(range(len(QUERIES)), pa.int32()), "query": QUERIES}), queries)
    return str(balanced), str(images), str(queries)


def scattered(tmp_path, name="shuffle", **kwargs) -> pa.Table:
    balanced, images, queries = write_inputs(tmp_path, **kwargs)
    info = shard.scatter_part(balanced, images, queries, part=0, seed=0, buckets=1, shuffle=str(tmp_path / name))
    track_outputs(str(tmp_path / name), [("{:06d}", 1)])
    rows = read_bucket(tmp_path / name, 0, shard.SAMPLE_SCHEMA)
    assert info == {"samples": rows.num_rows}
    return rows


def test_records_parse_to_the_metadata(tmp_path):
    rows = scattered(tmp_path)
    expected = {r[0]: {"uid": r[0], "url": r[1], "page_url": r[2], "query_ids": r[4],
                       "queries": [QUERIES[q] for q in r[4]], "width": r[5], "height": r[6],
                       "sha256": r[0] * 4, "phash": f"{r[7]:016x}", "origin": r[8]} for r in ROWS if r[9]}
    got = dict(zip(rows.column("uid").to_pylist(), rows.column("json").to_pylist()))
    assert sorted(got) == sorted(expected)
    for uid, raw in got.items():
        text = raw.decode("utf-8")  # valid UTF-8
        record = json.loads(text)
        assert record == expected[uid]
        assert list(record) == sorted(record)  # keys sorted
        assert not any(ord(c) < 0x20 for c in text)  # control characters escaped
    tricky = got["fedcba9876543210"].decode()
    assert "日本 😀" in tricky and "ünï" in tricky  # non-ASCII written as itself, not \u escapes
    # The other columns, and the rank order.
    assert rows.column("text").to_pylist() == [dict((r[0], r[3]) for r in ROWS)[u] for u in got]
    assert rows.column("image").to_pylist() == [u.encode()[:3] for u in got]
    assert rows.column("rank").to_pylist() == sorted(rows.column("rank").to_pylist())
    assert rows.column("rank").to_pylist() == shard.sample_rank(rows.column("uid"), 0).tolist()


def test_records_are_deterministic(tmp_path):
    a, b = scattered(tmp_path, "one"), scattered(tmp_path, "two")
    assert a.equals(b)


def test_kept_sample_without_image_fails(tmp_path):
    with pytest.raises(RuntimeError, match="1 kept samples have no image"):
        scattered(tmp_path, images_for=[r[0] for r in ROWS[1:]])
