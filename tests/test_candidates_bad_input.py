"""Bad input to the candidates stage: a bad row in a list, a cut WARC, and HTTP headers with bare LFs.

Every input is written here, by hand, byte for byte."""

import gzip
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.candidates.lists import plan_input, read_list
from pipelines.candidates.stage import extract as extract_part


def extract(tmp_path, path, kind, start=0, end=None):
    outputs = {"candidates": str(tmp_path / "c.parquet"), "rejects": str(tmp_path / "r.parquet")}
    info = extract_part(str(path), kind, "url", "caption", outputs, start, end)
    return info, pq.read_table(outputs["candidates"]).to_pylist(), pq.read_table(outputs["rejects"]).to_pylist()


# --- lists: one bad row is one reject ------------------------------------------------------------

GOOD = [(f"http://img.example/{i}.jpg", f"photo number {i}") for i in range(8)]


def csv_line(url, caption):
    return f"{url},{caption}\n".encode()


def jsonl_line(url, caption):
    return (json.dumps({"url": url, "caption": caption}) + "\n").encode()


# (kind, bad line, what the detail says, a good row written across two lines)
BAD_LINES = {
    "ragged_csv": ("csv", b"http://img.example/bad.jpg,a,b,c\n", "Expected 2 columns, got 4", False),
    "ragged_csv_quoted_newline": ("csv", b"http://img.example/bad.jpg,a,b,c\n", "Expected 2 columns, got 4", True),
    "latin1_csv": ("csv", "http://img.example/bad.jpg,caf\xe9 au lait\n".encode("latin-1"),
                   "invalid UTF-8 (byte 0xe9)", False),
    "ragged_tsv": ("tsv", b"http://img.example/bad.jpg\n", "Expected 2 columns, got 1", False),
    "broken_jsonl": ("jsonl", b'{"url": "http://img.example/bad.jpg", "caption": \n', "not JSON", False),
    "latin1_jsonl": ("jsonl", '{"url": "http://img.example/bad.jpg", "caption": "caf\xe9"}\n'.encode("latin-1"),
                     "invalid UTF-8 (byte 0xe9", False),
}


def write_list(path, kind, bad_line=None, multiline=False):
    """The GOOD rows, with `bad_line` after the fifth; with `multiline` the second caption is quoted
    and spans two lines. Returns the expected good rows."""
    rows = list(GOOD)
    if multiline:
        rows[1] = (rows[1][0], "photo\nover two lines")
    out = [b"url\tcaption\n" if kind == "tsv" else b"url,caption\n"] if kind != "jsonl" else []
    for i, (url, caption) in enumerate(rows):
        if kind == "jsonl":
            out.append(jsonl_line(url, caption))
        elif kind == "tsv":
            out.append(f"{url}\t{caption}\n".encode())
        else:
            out.append(csv_line(url, f'"{caption}"' if "\n" in caption else caption))
        if i == 4 and bad_line is not None:
            out.append(bad_line)
    data = b"".join(out)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return rows, data


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_a_bad_row_is_rejected_with_file_and_line_and_the_rest_is_kept(tmp_path, case):
    kind, bad_line, says, multiline = BAD_LINES[case]
    good_path, bad_path = tmp_path / f"good.{kind}", tmp_path / f"bad.{kind}"
    expected, _ = write_list(good_path, kind, multiline=multiline)
    _, data = write_list(bad_path, kind, bad_line, multiline)

    # The good list beside it: every row kept, nothing rejected.
    _, rows, rejects = extract(tmp_path, good_path, kind)
    assert [(r["url"], r["text"]) for r in rows] == [(u, " ".join(c.split())) for u, c in expected]
    assert rejects == []

    # The bad list: the same rows kept, each at the offset of its (first) line, and one reject.
    info, rows, rejects = extract(tmp_path, bad_path, kind)
    assert [(r["url"], r["text"]) for r in rows] == [(u, " ".join(c.split())) for u, c in expected]
    for r in rows:
        offset = int(r["origin"].rsplit(":", 1)[1])
        assert data[offset:].startswith((r["url"].encode(), b'{"url": "' + r["url"].encode())), r
    assert info["rows"] == len(expected)
    offset = data.index(bad_line)
    assert [(r["origin"], r["reason"]) for r in rejects] == [(f"bad.{kind}:{offset}", "bad_row")]
    detail = rejects[0]["detail"]
    line = data[:offset].count(b"\n") + 1  # the whole file is one range: its lines are the file's
    assert detail.startswith(f"line {line} of the range starting at byte 0: {says}"), detail


@pytest.mark.parametrize("case", ["ragged_csv", "latin1_csv", "broken_jsonl"])
def test_a_bad_row_in_a_later_range_names_the_range_and_its_line(tmp_path, case):
    kind, bad_line, says, _ = BAD_LINES[case]
    path = tmp_path / f"bad.{kind}"
    expected, data = write_list(path, kind, bad_line)
    ranges = plan_input(str(path), kind, 2)
    assert len(ranges) >= 3
    kept, rejected = [], []
    for start, end in ranges:
        _, rows, rejects = extract(tmp_path, path, kind, start, end)
        kept += [(r["url"], r["text"]) for r in rows]
        rejected += rejects
    assert kept == expected
    [reject] = rejected
    assert reject["origin"] == f"bad.{kind}:{data.index(bad_line)}" and reject["reason"] == "bad_row"
    # "line N of the range starting at byte B": the Nth line from B is the bad one.
    head, why = reject["detail"].split(": ", 1)
    number, begin = int(head.split()[1]), int(head.rsplit(" ", 1)[1])
    assert begin > 0 and why.startswith(says)
    assert data[begin:].split(b"\n")[number - 1] + b"\n" == bad_line


@pytest.mark.parametrize("case", ["ragged_csv", "broken_jsonl"])
def test_a_bad_row_in_a_compressed_list_is_named_by_line(tmp_path, case):
    kind, bad_line, says, _ = BAD_LINES[case]
    path = tmp_path / f"bad.{kind}.gz"
    expected, data = write_list(path, kind, bad_line)
    _, rows, rejects = extract(tmp_path, path, kind)
    assert [(r["url"], r["text"]) for r in rows] == expected
    line = data[:data.index(bad_line)].count(b"\n") + 1
    assert [(r["origin"], r["reason"], r["detail"].startswith(f"line {line}: {says}")) for r in rejects] == [
        (f"bad.{kind}.gz:line {line}", "bad_row", True)]


def test_read_list_without_a_rejects_list_refuses_a_bad_row_naming_it(tmp_path):
    path = tmp_path / "bad.csv"
    _, data = write_list(path, "csv", BAD_LINES["ragged_csv"][1])
    with pytest.raises(pa.ArrowInvalid, match=f"bad.csv:{data.index(BAD_LINES['ragged_csv'][1])}: line 7 "):
        read_list(str(path), "csv", 0, None)


# --- WARC files, written by hand -----------------------------------------------------------------

CRLF = b"\r\n"


def page(i):
    return (f'<html><body><p>page {i}</p><img src="/img/{i}a.jpg" alt="picture {i} a">'
            f'<img src="/img/{i}b.jpg" alt="picture {i} b"></body></html>').encode()


def http_block(body, content_type="text/html; charset=utf-8", eol=CRLF):
    lines = [b"HTTP/1.1 200 OK"]
    if content_type:
        lines.append(b"Content-Type: " + content_type.encode())
    lines += [b"Content-Length: %d" % len(body), b"Server: test"]
    return eol.join(lines) + eol + eol + body


def warc_record(uri, block):
    head = CRLF.join([b"WARC/1.0", b"WARC-Type: response", b"WARC-Target-URI: " + uri.encode(),
                      b"WARC-Date: 2009-01-01T00:00:00Z", b"WARC-Record-ID: <urn:uuid:" + uri.encode() + b">",
                      b"Content-Type: application/http; msgtype=response",
                      b"Content-Length: %d" % len(block)])
    return head + CRLF + CRLF + block + CRLF + CRLF


def responses(eol=CRLF):
    """Three HTML pages and, second, a JPEG."""
    records = [warc_record(f"http://example.com/p{i}.html", http_block(page(i), eol=eol)) for i in range(3)]
    records.insert(1, warc_record("http://example.com/x.jpg", http_block(b"\xff\xd8\xff" + bytes(400),
                                                                          "image/jpeg", eol=eol)))
    return records


def images(pages):
    return sorted(f"picture {i} {s}" for i in pages for s in "ab")


def pages_before(k):
    """The pages among responses()' first k records."""
    return [[0, None, 1, 2][i] for i in range(k) if i != 1]


def write_warc(path, records, gz):
    """The file's bytes and each record's offset (a gzip member per record when gz)."""
    parts = [gzip.compress(r) for r in records] if gz else records
    offsets = [sum(map(len, parts[:i])) for i in range(len(parts))]
    data = b"".join(parts)
    path.write_bytes(data)
    return data, offsets


def test_whole_warcs_read_cleanly(tmp_path):
    for gz in (False, True):
        path = tmp_path / ("whole.warc.gz" if gz else "whole.warc")
        _, offsets = write_warc(path, responses(), gz)
        info, rows, rejects = extract(tmp_path, path, "warc")
        assert info["pages"] == 3 and sorted(r["text"] for r in rows) == images([0, 1, 2])
        assert [(r["origin"], r["reason"], r["detail"]) for r in rejects] == [
            (f"{path.name}:{offsets[1]}", "not_html", "image/jpeg")]


def cut_points(record: bytes):
    """Places to cut one uncompressed record: inside the WARC header, inside the HTTP header, inside
    the payload, and one byte short of the payload's end."""
    http = record.index(CRLF + CRLF) + 4
    payload = record.index(CRLF + CRLF, http) + 4
    return {"warc header": record.index(b"WARC-Date"), "http header": http + 20,
            "payload": payload + 30, "last payload byte": len(record) - 5}


@pytest.mark.parametrize("where", ["warc header", "http header", "payload", "last payload byte"])
def test_an_uncompressed_warc_cut_in_a_record_names_it_and_keeps_the_records_before(tmp_path, where, caplog):
    records = responses()
    path = tmp_path / "cut.warc"
    for k in (2, 3):  # the third page (after the JPEG), and the last record
        data, offsets = write_warc(path, records, gz=False)
        path.write_bytes(data[:offsets[k] + cut_points(records[k])[where]])
        with caplog.at_level(logging.WARNING, logger="wit"):
            info, rows, rejects = extract(tmp_path, path, "warc")
        before = pages_before(k)
        assert info["pages"] == len(before) and sorted(r["text"] for r in rows) == images(before)
        bad = [r for r in rejects if r["reason"] == "bad_record"]
        assert [r["origin"] for r in bad] == [f"cut.warc:{offsets[k]}"], (where, k, rejects)
        assert "cut short" in bad[0]["detail"] and str(offsets[k]) in bad[0]["detail"]
        assert "cut.warc: record" in caplog.text and f"at offset {offsets[k]}" in caplog.text
        caplog.clear()


def test_a_gzipped_warc_cut_anywhere_in_a_member_names_that_member(tmp_path):
    records = responses()
    path = tmp_path / "cut.warc.gz"
    whole, offsets = write_warc(path, records, gz=True)
    ends = offsets[1:] + [len(whole)]
    for k in range(len(records)):
        size = ends[k] - offsets[k]
        for cut in sorted({offsets[k] + 12, offsets[k] + size // 2, ends[k] - 30, ends[k] - 3}):
            path.write_bytes(whole[:cut])
            info, rows, rejects = extract(tmp_path, path, "warc")
            bad = [r for r in rejects if r["reason"] == "bad_record"]
            assert [r["origin"] for r in bad] == [f"cut.warc.gz:{offsets[k]}"], (k, cut, rejects)
            before = pages_before(k)
            if cut == ends[k] - 3:  # only the gzip trailer lost: the record itself is whole and kept
                assert bad[0]["detail"].endswith("gzip stream ends early (file truncated?)")
                before = pages_before(k + 1)
            assert info["pages"] == len(before), (k, cut, info, bad)
            assert sorted(r["text"] for r in rows) == images(before)


def test_a_warc_cut_in_half(tmp_path):
    """The issue's case: half a .warc.gz, and half a .warc."""
    for gz in (True, False):
        path = tmp_path / ("half.warc.gz" if gz else "half.warc")
        data, offsets = write_warc(path, responses(), gz)
        path.write_bytes(data[:len(data) // 2])
        _, _, rejects = extract(tmp_path, path, "warc")
        bad = [r for r in rejects if r["reason"] == "bad_record"]
        k = max(i for i, o in enumerate(offsets) if o < len(data) // 2)
        assert [r["origin"] for r in bad] == [f"{path.name}:{offsets[k]}"], rejects


# --- HTTP headers with bare LF -------------------------------------------------------------------


def test_http_headers_with_bare_lf_give_their_pages_images(tmp_path):
    crlf, lf = tmp_path / "crlf.warc", tmp_path / "lf.warc"
    write_warc(crlf, responses(CRLF), gz=False)
    _, offsets = write_warc(lf, responses(b"\n"), gz=False)
    assert b"\r\n\r\nHTTP/1.1 200 OK\nContent-Type: text/html" in lf.read_bytes()
    info, rows, rejects = extract(tmp_path, lf, "warc")
    assert info["pages"] == 3 and sorted(r["text"] for r in rows) == images([0, 1, 2])
    assert [(r["origin"], r["reason"], r["detail"]) for r in rejects] == [
        (f"lf.warc:{offsets[1]}", "not_html", "image/jpeg")]
    assert {r["url"] for r in rows} == {f"http://example.com/img/{i}{s}.jpg" for i in range(3) for s in "ab"}
    # The same pages with CRLF give the same pairs.
    _, crlf_rows, _ = extract(tmp_path, crlf, "warc")
    assert sorted((r["url"], r["text"]) for r in crlf_rows) == sorted((r["url"], r["text"]) for r in rows)


def test_a_response_without_content_type_is_sniffed_and_every_skipped_one_counted(tmp_path):
    path = tmp_path / "untyped.warc"
    records = [warc_record("http://example.com/p0.html", http_block(b"<!DOCTYPE html>\n" + page(0), None)),
               warc_record("http://example.com/robots.txt", http_block(b"User-agent: *\n", None)),
               warc_record("http://example.com/s.css", http_block(b"body {}", "text/css", eol=b"\n"))]
    _, offsets = write_warc(path, records, gz=False)
    info, rows, rejects = extract(tmp_path, path, "warc")
    assert info["pages"] == 1 and sorted(r["text"] for r in rows) == images([0])
    assert [(r["origin"], r["reason"], r["detail"]) for r in rejects] == [
        (f"untyped.warc:{offsets[1]}", "not_html", "no content type"),
        (f"untyped.warc:{offsets[2]}", "not_html", "text/css")]


def test_a_warc_that_yields_no_page_says_so(tmp_path, caplog):
    path = tmp_path / "images-only.warc"
    records = [warc_record(f"http://example.com/{i}.png", http_block(b"\x89PNG" + bytes(50), "image/png", eol=b"\n"))
               for i in range(3)]
    write_warc(path, records, gz=False)
    with caplog.at_level(logging.WARNING, logger="wit"):
        info, rows, rejects = extract(tmp_path, path, "warc")
    assert info["pages"] == 0 and rows == []
    assert [(r["reason"], r["detail"]) for r in rejects] == [("not_html", "image/png")] * 3
    assert "images-only.warc: no HTML pages in 3 responses" in caplog.text


def test_a_file_named_parquet_that_is_not_parquet_is_one_error_naming_it(tmp_path):
    """Planning does not stop with pyarrow's traceback: that input's partition fails with its name,
    and the good input beside it completes."""
    import tomli_w
    from conftest import wit

    (tmp_path / "good.csv").write_text("url,caption\nhttp://a.example/cat.jpg,a cat on a mat\n")
    (tmp_path / "pairs.parquet").write_text("url,caption\nhttp://b.example/dog.jpg,not parquet at all\n")
    recipe = tmp_path / "r.toml"
    recipe.write_text(tomli_w.dumps({
        "run": {"name": "r", "root": str(tmp_path / "runs"), "workers": 1},
        "queries": {"wordnet": "", "unigram_counts": str(tmp_path / "good.csv")},
        "candidates": {"inputs": [str(tmp_path / "good.csv"), str(tmp_path / "pairs.parquet")]}}))
    proc = wit("run", recipe, "--stage", "candidates", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "1 of 2 partitions failed" in proc.stderr
    assert f"{tmp_path / 'pairs.parquet'}: not a readable parquet file" in proc.stderr
    good = pq.read_table(tmp_path / "runs/r/candidates/part-good.csv.parquet")
    assert good.column("text").to_pylist() == ["a cat on a mat"]
