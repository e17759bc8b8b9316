"""Bad dumps get clear errors naming the file and the offset or page; good records survive."""

import bz2

import pyarrow.parquet as pq
import pytest
from conftest import FOOTER, HEADER, page_xml, wit, write_dump, write_recipe

from queries.counting import count_part
from queries.dump import DumpPart, iter_page_bytes
from wit_builder.errors import WitError


def pages_of(path):
    return list(iter_page_bytes(DumpPart(str(path))))


def test_truncated_bz2_names_file_and_compressed_offset(tmp_path, sample_xml):
    data = bz2.compress(sample_xml)
    path = tmp_path / "cut.xml.bz2"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WitError) as e:
        pages_of(path)
    msg = str(e.value)
    assert str(path) in msg and "truncated bz2" in msg and "compressed byte 0" in msg


def test_corrupt_bz2_data(tmp_path, sample_xml):
    data = bytearray(bz2.compress(sample_xml))
    data[5000:5100] = b"\x00" * 100
    path = tmp_path / "corrupt.xml.bz2"
    path.write_bytes(bytes(data))
    with pytest.raises(WitError, match="corrupt bz2 data") as e:
        pages_of(path)
    assert str(path) in str(e.value)


def test_truncated_xml_names_the_page(tmp_path):
    data = HEADER + page_xml("Good", "fine text") + page_xml("Cut off", "half a page")
    path = tmp_path / "cut.xml"
    path.write_bytes(data[:-40])
    with pytest.raises(WitError, match="dump ends inside page 'Cut off'") as e:
        pages_of(path)
    assert str(path) in str(e.value) and "uncompressed byte" in str(e.value)


@pytest.mark.parametrize("content", [b"", HEADER + FOOTER])
def test_empty_dump(tmp_path, content):
    path = tmp_path / "empty.xml"
    path.write_bytes(content)
    with pytest.raises(WitError, match="empty dump") as e:
        from queries.dump import plan_parts

        for part in plan_parts(str(path), 1 << 20):
            list(iter_page_bytes(part))
    assert str(path) in str(e.value)


def test_malformed_xml_and_invalid_utf8_pages_are_skipped_and_recorded(tmp_path):
    bad_xml = page_xml("Broken", "x").replace(b"<ns>0</ns>", b"<ns>0</nss>")
    bad_utf8 = page_xml("Latin1", "caf\u00e9 words").replace("é".encode(), b"\xe9")
    good = [page_xml("One", "alpha beta"), page_xml("Two", "beta gamma")]
    path = tmp_path / "mixed.xml.bz2"
    data = HEADER + good[0] + bad_xml + bad_utf8 + good[1] + FOOTER
    path.write_bytes(bz2.compress(data))
    outputs = {n: str(tmp_path / f"{n}.parquet") for n in ("unigrams", "bigrams", "titles", "links", "errors")}
    info = count_part(str(path), 0, None, outputs)
    assert info["articles"] == 2 and info["bad_pages"] == 2
    errors = pq.read_table(outputs["errors"]).to_pylist()
    assert [(e["page"], e["reason"].split(":")[0].split(" (")[0]) for e in errors] == [
        ("Broken", "malformed XML"), ("Latin1", "invalid UTF-8")]
    assert errors[0]["offset"] == data.index(b"<page>", data.index(bad_xml))  # where the page starts
    assert errors[1]["offset"] == data.index(b"\xe9")  # the bad byte itself
    unigrams = {r["token"]: r["count"] for r in pq.read_table(outputs["unigrams"]).to_pylist()}
    assert unigrams == {"alpha": 1, "beta": 2, "gamma": 1}


def test_a_bad_file_fails_its_partition_and_keeps_the_good_ones(tmp_path, sample_xml):
    good = write_dump(tmp_path / "good.xml.bz2", [("A", "alpha beta")])
    bad = tmp_path / "bad.xml.bz2"
    data = bz2.compress(sample_xml)
    bad.write_bytes(data[: len(data) // 3])
    recipe = write_recipe(tmp_path, wikipedia=[str(good), str(bad)])
    proc = wit("run", recipe, check=False)
    assert proc.returncode == 2
    assert "1 of 2 partitions failed" in proc.stderr and str(bad) in proc.stderr
    assert "truncated bz2" in proc.stderr
    state = tmp_path / "runs" / "t" / "_state" / "queries"
    assert [p.name for p in state.glob("*.json")] == ["good.xml.bz2.json"]

    bad.write_bytes(data)  # the user repairs the file; only it is redone
    proc = wit("run", recipe)
    assert "1 already complete, 1 to run" in proc.stderr


def test_dump_not_found(tmp_path):
    proc = wit("run", write_recipe(tmp_path, wikipedia=[str(tmp_path / "missing.xml.bz2")]), check=False)
    assert proc.returncode == 2 and "inputs not found" in proc.stderr
    assert f"queries.wikipedia: {tmp_path / 'missing.xml.bz2'}: file not found" in proc.stderr
