"""Tux Paint's stamps as a small captioned web: 785 drawings, each with a one-line English
description (Debian's `tuxpaint-stamps-default`, GPL), written as a WARC of web pages that the demo
reads as candidates and replays on the miniature web, so `make demo` downloads real captioned images.

One page per stamp folder on the host `stamps.wit.test`, each image an `<img src alt>` with the
stamp's description as its alt text; every fifth stamp (by a hash of its path, so the choice does not
depend on which stamps exist) is held out of the pages and copied to two image folders instead, for
zero-shot evaluation of a model trained on the demo (`wit eval --data`): `held-out/categories/` (one
class per top-level folder: animals, food, symbols, ...) and `held-out/captions/` (one class per
description: which of the held-out descriptions a drawing matches, with `caption-template.txt`):

    .venv/bin/python -m pipelines.demo.stamps runs/stamps          # stamps.warc.gz, held-out/
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

from wit_builder.workspace import atomic_write_bytes

STAMPS = Path("/usr/share/tuxpaint/stamps")
HOST = "stamps.wit.test"
HELD_OUT_EVERY = 5
WARC_DATE = "2022-06-04T00:00:00Z"  # the package's release, so the WARC is the same on every build


@dataclass(frozen=True)
class Stamp:
    path: Path  # relative to the stamps folder
    description: str

    @property
    def category(self) -> str:
        return self.path.parts[0]

    @property
    def flat_name(self) -> str:
        """Its path inside its category as one file name (names repeat across sub-folders)."""
        return "-".join(self.path.parts[1:])

    @property
    def held_out(self) -> bool:
        return int(hashlib.sha256(self.path.as_posix().encode()).hexdigest(), 16) % HELD_OUT_EVERY == 0


def find_stamps(root: Path = STAMPS) -> list[Stamp]:
    """Every PNG stamp with an English description (the first line of its .txt), sorted by path."""
    out = []
    for png in sorted(root.rglob("*.png")):
        text = png.with_suffix(".txt")
        if not text.is_file():
            continue
        first = text.read_text(encoding="utf-8", errors="replace").splitlines()[:1]
        description = " ".join(first[0].split()) if first else ""
        if description:  # the English line comes first, translations (`lang.utf8=...`) after it
            out.append(Stamp(png.relative_to(root), description))
    return out


def _response(uri: str, content_type: str, body: bytes):
    from fastwarc.warc import WarcRecord, WarcRecordType

    http = (f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode())
    record = WarcRecord()
    record.init_headers(record_type=WarcRecordType.response,
                        record_urn=f"uuid:{hashlib.sha256(uri.encode()).hexdigest()[:32]}".encode())
    record.headers["WARC-Target-URI"] = uri
    record.headers["WARC-Date"] = WARC_DATE
    record.headers["Content-Type"] = "application/http; msgtype=response"
    record.set_bytes_content(http + body)
    return record


def page(folder: str, stamps: list[Stamp]) -> bytes:
    items = "\n".join(f'<figure><img src="/{html.escape(s.path.as_posix())}" alt="{html.escape(s.description)}">'
                      f"</figure>" for s in stamps)
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>Stamps: {html.escape(folder)}</title></head>"
            f"<body><h1>{html.escape(folder)}</h1>\n{items}\n</body></html>").encode()


def build(output: Path, root: Path = STAMPS) -> dict:
    """output/stamps.warc.gz (pages and images of the stamps not held out) and output/held-out/."""
    stamps = find_stamps(root)
    if not stamps:
        raise SystemExit(f"{root}: no stamps (apt-get install tuxpaint-stamps-default)")
    shown = [s for s in stamps if not s.held_out]
    folders: dict[str, list[Stamp]] = {}
    for s in shown:
        folders.setdefault(s.path.parent.as_posix(), []).append(s)
    output.mkdir(parents=True, exist_ok=True)
    out = io.BytesIO()

    def write(uri: str, content_type: str, body: bytes) -> None:
        record = io.BytesIO()
        _response(uri, content_type, body).write(record)
        out.write(gzip.compress(record.getvalue(), mtime=0))  # one gzip member per record, as WARCs are

    for folder, members in folders.items():
        write(f"http://{HOST}/{folder}/", "text/html; charset=utf-8", page(folder, members))
        for s in members:
            write(f"http://{HOST}/{s.path.as_posix()}", "image/png", (root / s.path).read_bytes())
    warc = output / "stamps.warc.gz"
    if not warc.is_file() or warc.read_bytes() != out.getvalue():  # unchanged: runs that read it stay valid
        atomic_write_bytes(warc, out.getvalue())
    held, tmp = output / "held-out", output / ".held-out.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for s in stamps:
        if s.held_out:
            # Two zero-shot sets: 15 categories, and each description as its own class (image-to-text
            # retrieval among the held-out stamps), with the description itself as the only prompt.
            for folder in (tmp / "categories" / s.category, tmp / "captions" / s.description.replace("/", " ")):
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / s.path, folder / s.flat_name)
    (tmp / "caption-template.txt").write_text("{}\n")
    shutil.rmtree(held, ignore_errors=True)
    tmp.rename(held)
    return {"stamps": len(stamps), "pages": len(folders), "shown": len(shown), "held_out": len(stamps) - len(shown)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", type=Path)
    ap.add_argument("--stamps", type=Path, default=STAMPS)
    a = ap.parse_args(argv)
    counts = build(a.output, a.stamps)
    print(f"{a.output}: {counts['shown']:,} stamps on {counts['pages']} pages in stamps.warc.gz, "
          f"{counts['held_out']:,} held out in held-out/")


if __name__ == "__main__":
    main()
