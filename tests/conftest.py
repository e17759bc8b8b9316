"""Fixtures: real sample data from the repo's data/ folder, and small dumps written per test."""

from __future__ import annotations

import bz2
import os
import subprocess
import sys
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DUMP = REPO / "data" / "wikipedia" / "enwiki-sample.xml.bz2"
WORD_COUNTS = REPO / "data" / "wordcounts" / "wikipedia-word-counts.txt.gz"
WORDNET = Path("/usr/share/wordnet")

HEADER = b"""<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">
  <siteinfo>
    <sitename>Wikipedia</sitename>
  </siteinfo>
"""
FOOTER = b"</mediawiki>\n"


def page_xml(title: str, text: str, ns: int = 0, redirect: str | None = None, pid: int = 1) -> bytes:
    red = f'    <redirect title="{escape(redirect)}" />\n' if redirect else ""
    return (
        f"  <page>\n    <title>{escape(title)}</title>\n    <ns>{ns}</ns>\n    <id>{pid}</id>\n{red}"
        f"    <revision>\n      <id>{pid}</id>\n      <text xml:space=\"preserve\">{escape(text)}</text>\n"
        f"    </revision>\n  </page>\n"
    ).encode()


def write_dump(path: Path, pages: list[tuple], compress: bool = True) -> Path:
    """pages: (title, text) or (title, text, ns, redirect)."""
    body = b"".join(page_xml(*p, pid=i + 1) if len(p) <= 4 else page_xml(*p) for i, p in enumerate(pages))
    data = HEADER + body + FOOTER
    path.write_bytes(bz2.compress(data) if compress else data)
    return path


def write_recipe(tmp_path: Path, name: str = "t", run: dict | None = None, **queries) -> Path:
    """A recipe in tmp_path whose runs go to tmp_path/runs."""
    import tomli_w

    settings = {"wordnet": "", "min_count": 1, "bigram_min_count": 1, "min_pmi": 0.0,
                "title_min_inlinks": 0}
    settings.update(queries)
    doc = {"run": {"name": name, "root": str(tmp_path / "runs"), "workers": 1, **(run or {})},
           "queries": settings}
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def wit(*args: str, check: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """The real `wit` command line, in a subprocess."""
    env = {**(env or os.environ), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "wit_builder.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"wit {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def sample_xml() -> bytes:
    return bz2.decompress(SAMPLE_DUMP.read_bytes())


@pytest.fixture
def multistream_dump(tmp_path, sample_xml) -> Path:
    """The real sample rewritten as a multistream dump (20 pages a stream) with its index."""
    from queries.dump import write_multistream

    start = sample_xml.index(b"  <page>")
    end = sample_xml.rindex(b"</mediawiki>")
    out = tmp_path / "enwiki-sample-multistream.xml.bz2"
    write_multistream(sample_xml[start:end], sample_xml[:start], sample_xml[end:], out,
                      tmp_path / "enwiki-sample-multistream-index.txt.bz2", pages_per_stream=20)
    return out


needs_wordnet = pytest.mark.skipif(
    not (WORDNET / "data.noun").exists() and not os.environ.get("CI"),
    reason="WordNet not installed (make setup installs it)",
)


FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION / "t10k-images-idx3-ubyte.gz").exists() and not os.environ.get("CI"),
    reason="Fashion-MNIST not installed (make setup installs it)",
)
