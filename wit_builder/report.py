"""`wit report`: one self-contained report.html with plots, for looking at a run before training.

Plots are drawn with matplotlib and embedded as PNG data, thumbnails are read from the shards, and the
tables come from the same SQL files as `wit stats`, so the page opens offline and its numbers are the
ones `wit stats` prints.
"""

from __future__ import annotations

import base64
import html
import io
import json
import tarfile
from pathlib import Path

from . import sql, stats, storage, workspace
from .language import identify, stop_words
from .stage import views_named


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _table(rel) -> str:
    cols = rel.columns
    rows = rel.fetchall()
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in r)
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(title: str, uri: str, name: str) -> str:
    return f'<figure><img class="plot" data-plot="{name}" alt="{html.escape(title)}" src="{uri}">' \
           f"<figcaption>{html.escape(title)}</figcaption></figure>"


def _plots(con, views: set[str]) -> list[str]:
    """The funnel and the failure reasons from the funnel view, then each stage's own plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .stage import registered

    out = []
    steps = [(s.kept[0], s.kept[1]) for s in registered() if s.kept[1] and set(views_named(s.kept[1])) <= views]
    if len(steps) >= 2:
        values = [con.execute(q).fetchone()[0] for _, q in steps]
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.barh([s for s, _ in steps][::-1], values[::-1], color="#4c72b0")
        for i, v in enumerate(values[::-1]):
            ax.text(v, i, f" {v:,}", va="center")
        ax.set_xlabel("pairs")
        ax.set_title("The funnel")
        out.append(_figure("The funnel", _png(fig), "funnel"))

    reasons = con.execute("SELECT step || ': ' || reason, sum(rows) FROM funnel WHERE reason IS NOT NULL "
                          "AND step NOT LIKE '% kept' GROUP BY 1").fetchall() if "funnel" in views else []
    if reasons:
        reasons.sort(key=lambda r: (r[1], r[0]))
        fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(reasons))))
        ax.barh([r[0] for r in reasons], [r[1] for r in reasons], color="#dd8452")
        ax.set_xlabel("rows")
        ax.set_title("Failure and drop reasons")
        out.append(_figure("Failure and drop reasons", _png(fig), "reasons"))

    for stage in registered():
        for plot in stage.plots:
            if set(plot.needs_views) <= views and (fig := plot.draw(con)) is not None:
                out.append(_figure(plot.title, _png(fig), plot.name))
    return out


def _gallery(run_dir: Path, per_query: int = 4, queries: int = 6, samples: int = 1000) -> str:
    """Thumbnails of a few samples for the queries with the most samples in the first shards, read
    until `samples` (the shards hold the samples in a random order, so their first ones are a fair
    sample of a corpus of any size). A query that is a stop word of its caption's language ("a",
    "the", "der") says nothing about the images, so it is passed over."""
    from PIL import Image

    by_query: dict[str, list[tuple[str, bytes, str]]] = {}
    seen = 0
    for path in workspace.glob(run_dir / "shards", "*.tar"):
        if seen >= samples:
            break
        with storage.open_input(workspace.location(path)) as f, tarfile.open(fileobj=f) as tf:
            members = {m.name: m for m in tf}
            for name, member in members.items():
                if not name.endswith(".json"):
                    continue
                key = name[:-5]
                meta = json.loads(tf.extractfile(member).read())
                seen += 1
                image = next((tf.extractfile(members[f"{key}.{e}"]).read() for e in ("jpg", "png", "webp")
                              if f"{key}.{e}" in members), None)
                caption = tf.extractfile(members[f"{key}.txt"]).read().decode() if f"{key}.txt" in members else ""
                if image is None:
                    continue
                stop = caption_stop_words(caption)
                for q in [q for q in meta.get("queries", []) if q.lower() not in stop][:3]:
                    by_query.setdefault(q, []).append((key, image, caption))
    if not by_query:
        return "<p>No shards yet.</p>"
    chosen = sorted(by_query, key=lambda q: (-len(by_query[q]), q))[:queries]
    parts = []
    for q in chosen:
        cells = []
        for _, image, caption in by_query[q][:per_query]:
            im = Image.open(io.BytesIO(image)).convert("RGB")
            im.thumbnail((128, 128))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=85)
            uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
            cells.append(f'<figure class="thumb"><img class="thumb" alt="{html.escape(caption)}" src="{uri}">'
                         f"<figcaption>{html.escape(caption[:60])}</figcaption></figure>")
        parts.append(f'<h3>{html.escape(q)}</h3><div class="gallery">{"".join(cells)}</div>')
    return "".join(parts)


def caption_stop_words(caption: str) -> frozenset[str]:
    """The stop words of the caption's language (English's where the language is unsure)."""
    lang, confidence = identify(caption) if caption.strip() else ("en", 0.0)
    return stop_words(lang if confidence >= 0.5 else "en")


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;
font-size:13px;text-align:left}th{background:#f0f0f0}figure{display:inline-block;margin:.5em}
img.plot{max-width:100%}.gallery{display:flex;flex-wrap:wrap}figure.thumb{width:140px}
figure.thumb figcaption{font-size:11px}"""


def write_report(run_dir: Path, output: Path | None = None) -> Path:
    con = sql.connect(run_dir)
    views = set(sql.views(con))
    sections = [f"<h1>wit-builder run: {html.escape(run_dir.name)}</h1>", "<h2>Plots</h2>",
                "".join(_plots(con, views)) or "<p>Nothing to plot yet.</p>", "<h2>Gallery</h2>",
                _gallery(run_dir), "<h2>Reports</h2>"]
    for i, (title, result) in enumerate(stats.run_reports(run_dir)):
        body = f"<p>({html.escape(result)})</p>" if isinstance(result, str) else _table(result)
        sections.append(f'<section data-report="{i}"><h3>{html.escape(title)}</h3>{body}</section>')
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>wit report: {html.escape(run_dir.name)}"
            f"</title><style>{CSS}</style></head><body>{''.join(sections)}</body></html>")
    output = output or run_dir / "report.html"
    from .workspace import atomic_write_bytes

    atomic_write_bytes(output, page.encode())
    return output
