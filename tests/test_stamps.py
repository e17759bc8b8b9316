"""Tux Paint's stamps as the demo's captioned web (pipelines/demo/stamps.py), on the real package that
`make setup` installs."""

import json
import tomllib
import urllib.request

import ftfy
import pyarrow.parquet as pq
import pytest
import tomli_w
from conftest import REPO, wit
from test_corpus import CHROMIUM
from test_download import make_run

from pipelines.candidates.collector import Collector
from pipelines.candidates.warc import read_warc
from pipelines.demo.stamps import HOST, STAMPS, build, find_stamps
from pipelines.download.miniweb import MiniWeb

pytestmark = pytest.mark.skipif(not STAMPS.is_dir(), reason="tuxpaint-stamps-default is not installed (make setup)")


@pytest.fixture(scope="module")
def stamps_web(tmp_path_factory):
    output = tmp_path_factory.mktemp("stamps")
    return output, build(output)


def test_the_pages_carry_every_shown_stamp_with_its_description(stamps_web, tmp_path):
    output, counts = stamps_web
    stamps = find_stamps()
    shown = {f"http://{HOST}/{s.path.as_posix()}": s.description for s in stamps if not s.held_out}
    collector = Collector()
    read_warc(str(output / "stamps.warc.gz"), collector)
    pairs = {url: text for _, url, text, *_ in collector.rows.values()}
    assert pairs == shown and counts["shown"] == len(shown) > 500
    # About a fifth held out, by category, none of them on a page; the build is reproducible.
    held = sorted(p.relative_to(output / "held-out" / "categories")
                  for p in (output / "held-out" / "categories").rglob("*.png"))
    captions = {p.parent.name for p in (output / "held-out" / "captions").rglob("*.png")}
    assert captions == {s.description.replace("/", " ") for s in stamps if s.held_out}
    assert 0.15 < len(held) / len(stamps) < 0.25 and len(held) == counts["held_out"]
    assert {p.parts[0] for p in held} <= {s.category for s in stamps}
    assert {p.name for p in held} == {s.flat_name for s in stamps if s.held_out}
    again = tmp_path / "again"
    build(again)
    assert (again / "stamps.warc.gz").read_bytes() == (output / "stamps.warc.gz").read_bytes()
    # Built again in place, an unchanged WARC is not rewritten: runs that read it stay complete.
    before = (output / "stamps.warc.gz").stat().st_mtime_ns
    build(output)
    assert (output / "stamps.warc.gz").stat().st_mtime_ns == before


def test_the_miniature_web_serves_the_stamps(stamps_web):
    output, _ = stamps_web
    stamp = next(s for s in find_stamps() if not s.held_out)
    with MiniWeb([output / "stamps.warc.gz"]) as web:
        host, port = web.address
        request = urllib.request.Request(f"http://{host}:{port}/{stamp.path.as_posix()}", headers={"Host": HOST})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.headers["Content-Type"] == "image/png"
            assert answer.read() == (STAMPS / stamp.path).read_bytes()


@pytest.mark.slow
def test_stamps_reach_the_shards_and_the_report_in_chromium(stamps_web, tmp_path):
    from playwright.sync_api import sync_playwright

    output, _ = stamps_web
    warc = str(output / "stamps.warc.gz")
    recipe, run_dir = make_run(tmp_path, "stamps", [], {"replay": [warc], "allow_loopback": True, "thread_count": 16},
                               words=("letter", "flower", "christmas", "dinosaur", "coin", "frog", "sign"))
    settings = tomllib.loads(recipe.read_text())
    settings["candidates"]["inputs"] = [warc]
    settings["balance"] = {"t": 50, "oversample": 0}
    recipe.write_text(tomli_w.dumps(settings))
    wit("run", recipe)
    descriptions = {ftfy.fix_text(s.description) for s in find_stamps()}  # as the filter stage fixes text
    captions = [t for part in sorted((run_dir / "matched").glob("part-*.parquet"))
                for t in pq.read_table(part, columns=["text"]).column("text").to_pylist()]
    assert len(captions) > 100 and set(captions) <= descriptions
    assert sum(json.loads((run_dir / "shards" / "sizes.json").read_text()).values()) > 100
    report = tmp_path / "report.html"
    wit("report", run_dir, "-o", report)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(report.as_uri())
        queries = page.eval_on_selector_all("div.gallery", "els => els.map(e => e.previousElementSibling.textContent)")
        thumbs = page.eval_on_selector_all("figure.thumb", "els => els.map(f => [f.querySelector('img').naturalWidth, "
                                                           "f.querySelector('figcaption').textContent])")
        page.screenshot(path=str(REPO / "runs" / "report-stamps.png"), full_page=True)
        browser.close()
    # The gallery shows the stamps under their queries, drawn, captioned by their descriptions.
    assert "letter" in queries and len(thumbs) >= 8
    assert all(width > 0 for width, _ in thumbs)
    assert all(any(d.startswith(caption) for d in descriptions) for _, caption in thumbs)  # cut at 60
