"""Candidates from real WARCs, a WAT in Common Crawl's layout, and img2dataset-style lists."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, write_recipe

from pipelines.candidates.html import largest_srcset
from pipelines.candidates.stage import CandidatesStage
from pipelines.candidates.stage import extract as extract_part
from pipelines.urls import normalise_url
from wit_builder.errors import WitError
from wit_builder.recipe import load_recipe
from wit_builder.runner import LocalExecutor, run_stage
from wit_builder.workspace import Run

WARC = REPO / "data" / "warc"
EDGE = REPO / "tests" / "data" / "warc-edge-cases"


def extract(tmp_path, path, kind, **kw):
    outputs = {"candidates": str(tmp_path / "c.parquet"), "rejects": str(tmp_path / "r.parquet")}
    info = extract_part(str(path), kind, kw.get("url_col", "url"), kw.get("caption_col", "caption"),
                           outputs)
    return info, pq.read_table(outputs["candidates"]).to_pylist(), pq.read_table(outputs["rejects"]).to_pylist()


def test_real_archive_warc(tmp_path):
    info, rows, rejects = extract(tmp_path, WARC / "aut-example-2008.warc.gz", "warc")
    # 140 HTML pages with 858 <img>, 666 of them with alt text (data/README).
    assert info["pages"] == 140
    by_reason = {}
    for r in rejects:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    assert len(rows) + by_reason["duplicate"] + by_reason["no_text"] == 858
    assert len({(r["url"], r["text"]) for r in rows}) == len(rows)
    for r in rows:
        assert r["url"].startswith(("http://", "https://")) and r["text"] == " ".join(r["text"].split())
        assert r["origin"].startswith("aut-example-2008.warc.gz:") and r["attribute"].endswith((":alt", ":title"))
    # A relative src was resolved against its page.
    assert any(r["page_url"] and r["url"].startswith(r["page_url"].rsplit("/", 1)[0]) for r in rows)


def test_common_crawl_warc(tmp_path):
    info, rows, _ = extract(tmp_path, WARC / "cc-main-2020-34-sample.warc.gz", "warc")
    assert info["pages"] == 16 and 0 < len(rows) <= 32  # 153 <img>, 32 with alt


def test_html_rules(tmp_path):
    from fastwarc.warc import WarcRecordType  # noqa: F401  (the reader's library, used below)

    from pipelines.candidates.collector import Collector
    from pipelines.candidates.html import html_images

    html = b"""<html><head><base href="http://cdn.example.com/img/"></head><body>
      <img src="a.jpg" alt="  A  red  fox ">
      <img src="data:image/gif;base64,R0l" data-src="lazy.jpg" alt="lazy dog">
      <img srcset="s.jpg 100w, l.jpg 800w, m.jpg 400w" alt="big cat">
      <img src="t.jpg" title="title only">
      <img src="n.jpg">
      <img src="javascript:x()" alt="script">
      <img src="data:image/png;base64,AA" alt="inline">
    </body></html>"""
    c = Collector()
    html_images(c, html, "http://example.com/page.html", "f:0")
    got = {r[2]: (r[1], r[5]) for r in c.rows.values()}
    assert got == {
        "A red fox": ("http://cdn.example.com/img/a.jpg", "src:alt"),
        "lazy dog": ("http://cdn.example.com/img/lazy.jpg", "data-src:alt"),
        "big cat": ("http://cdn.example.com/img/l.jpg", "srcset:alt"),
        "title only": ("http://cdn.example.com/img/t.jpg", "src:title"),
    }
    assert sorted(r[1] for r in c.rejects) == ["bad_scheme", "data_uri", "no_text"]


def test_url_normalisation():
    assert normalise_url("../b c.png", "HTTP://Ex.COM:80/a/x/") == ("http://ex.com/a/b%20c.png", "")
    assert normalise_url("//x.org/i.gif#top", "https://y/") == ("https://x.org/i.gif", "")
    assert normalise_url("ftp://x/y.jpg")[1] == "bad_scheme"
    assert normalise_url("img.jpg")[1] == "relative_url"
    assert largest_srcset("a.jpg 1x, b.jpg 2x") == "b.jpg"


def test_wat_in_common_crawl_layout(tmp_path):
    """The real WAT sample holds only a request record; a response record is added in the layout
    Common Crawl writes (Envelope > Payload-Metadata > HTTP-Response-Metadata > HTML-Metadata)."""
    real = gzip.decompress((WARC / "cc-main-2024-22-whirlwind.warc.wat.gz").read_bytes())
    envelope = {"Envelope": {
        "WARC-Header-Metadata": {"WARC-Type": "response", "WARC-Target-URI": "https://en.example.org/wiki/Fox"},
        "Payload-Metadata": {"HTTP-Response-Metadata": {"HTML-Metadata": {
            "Head": {"Title": "Fox", "Base": "https://upload.example.org/"},
            "Links": [{"path": "A@/href", "url": "/wiki/Dog", "text": "dog"},
                      {"path": "IMG@/src", "url": "fox.jpg", "alt": "A red fox"},
                      {"path": "IMG@/src", "url": "//x.org/n.png"}]}}}}}
    payload = json.dumps(envelope).encode()
    record = (b"WARC/1.0\r\nWARC-Type: metadata\r\nWARC-Target-URI: https://en.example.org/wiki/Fox\r\n"
              b"Content-Type: application/json\r\nContent-Length: " + str(len(payload)).encode() +
              b"\r\n\r\n" + payload + b"\r\n\r\n")
    path = tmp_path / "x.warc.wat.gz"
    path.write_bytes(gzip.compress(real + record))
    info, rows, rejects = extract(tmp_path, path, "wat")
    assert info["pages"] == 1
    assert [(r["url"], r["text"], r["page_url"]) for r in rows] == [
        ("https://upload.example.org/fox.jpg", "A red fox", "https://en.example.org/wiki/Fox")]
    assert [r["reason"] for r in rejects] == ["no_text"]


@pytest.mark.parametrize("kind", ["parquet", "csv", "tsv", "jsonl"])
def test_tabular_lists(tmp_path, kind):
    table = pa.table({"URL": ["http://a/1.jpg", "http://a/2.jpg", "data:x", "http://a/1.jpg", "http://a/3.jpg"],
                      "TEXT": ["one", "two", "three", "one", ""]})
    path = tmp_path / f"list.{kind}"
    if kind == "parquet":
        pq.write_table(table, path)
    elif kind in ("csv", "tsv"):
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path, pacsv.WriteOptions(delimiter="\t" if kind == "tsv" else ","))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    info, rows, rejects = extract(tmp_path, path, kind, url_col="URL", caption_col="TEXT")
    data = path.read_bytes()

    def origin(row, url):  # parquet: the row number; text lists: the byte offset of the row's line
        if kind == "parquet":
            return f"list.{kind}:{row}"
        return f"list.{kind}:{data.rfind(bytes([10]), 0, data.index(url)) + 1}"

    assert [(r["url"], r["text"], r["origin"]) for r in rows] == [
        ("http://a/1.jpg", "one", origin(0, b"http://a/1.jpg")), ("http://a/2.jpg", "two", origin(1, b"http://a/2.jpg"))]
    assert sorted(r["reason"] for r in rejects) == ["data_uri", "duplicate", "no_text"]
    with pytest.raises(WitError, match="no column 'url'.*URL, TEXT"):
        extract(tmp_path, path, kind)


def test_edge_case_warcs_keep_good_records_and_name_the_offset(tmp_path):
    info, rows, rejects = extract(tmp_path, EDGE / "example-trunc.warc", "warc")
    assert [r["reason"] for r in rejects] == ["bad_record"]
    assert rejects[0]["origin"] == "example-trunc.warc:1197"  # the last good record's offset
    for name in ("example-bad-non-chunked.warc.gz", "example-wrong-chunks.warc.gz",
                 "example-space-in-target-uri.warc.gz", "example-wget-bad-target-uri.warc.gz"):
        extract(tmp_path, EDGE / name, "warc")  # odd but readable: no crash
    _, _, rejects = extract(tmp_path, EDGE / "bad.arc", "arc")
    assert [r["reason"] for r in rejects] == ["arc_format"]


def test_stage_dedups_across_partitions_and_one_text_per_url(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("url,caption\nhttp://x/1.jpg,a red fox\nhttp://x/2.jpg,first text\n")
    b.write_text("url,caption\nhttp://x/1.jpg,a red fox\nhttp://x/2.jpg,second text\n")
    for one, expected in [(False, [(1, 0, "duplicate", "a.csv:12")]),
                          (True, [(1, 0, "duplicate", "a.csv:12"), (1, 1, "same_url", "a.csv:37")])]:
        recipe = write_recipe(tmp_path, f"d{one}", wordnet="", unigram_counts=str(REPO / "data/wordcounts/wikipedia-word-counts.txt.gz"))
        text = recipe.read_text() + f'\n[candidates]\ninputs = ["{a}", "{b}"]\none_text_per_url = {str(one).lower()}\n'
        recipe.write_text(text)
        run = Run(load_recipe(recipe))
        run_stage(CandidatesStage(), run, LocalExecutor(1))
        dups = pq.read_table(run.stage_dir("candidates") / "duplicates").to_pylist()
        assert [(d["part"], d["row"], d["reason"], d["first_origin"]) for d in dups] == expected


@pytest.mark.parametrize("body, charset", [
    ('<meta charset="utf-8"><img src="a.jpg" alt="A knight’s helmet — steel">'.encode(), None),
    ('<img src="a.jpg" alt="A knight’s helmet — steel">'.encode(), "utf-8"),
    ('<img src="a.jpg" alt="Crème brûlée">'.encode("latin-1"), "ISO-8859-1"),
])
def test_pages_decode_by_their_declared_charset(body, charset):
    """As browsers do: the HTTP charset, else <meta charset>; a guess from a few bytes reads UTF-8
    punctuation as Windows-1252 ("knightâ€™s")."""
    from pipelines.candidates.collector import Collector
    from pipelines.candidates.html import html_images

    c = Collector()
    html_images(c, b"<html><body>" + body + b"</body></html>", "http://example.com/", "f:0", charset)
    (text,) = [r[2] for r in c.rows.values()]
    assert text in ("A knight’s helmet — steel", "Crème brûlée")
