"""One partition's candidate rows and rejects: URLs normalised, in-partition duplicates rejected."""

from __future__ import annotations

import pyarrow as pa

from wit_builder.ids import uid
from wit_builder.workspace import write_parquet

from ..urls import normalise_url

CANDIDATES_SCHEMA = pa.schema([
    ("uid", pa.string()), ("url", pa.string()), ("text", pa.string()), ("page_url", pa.string()),
    ("origin", pa.string()), ("attribute", pa.string()),
])
REJECTS_SCHEMA = pa.schema([("origin", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


class Collector:
    """Rows and rejects of one partition; exact (url, text) duplicates inside it are rejected."""

    def __init__(self):
        self.rows: dict[str, tuple] = {}
        self.rejects: list[tuple[str, str, str]] = []

    def add(self, url: str, text: str, base: str, page_url: str, origin: str, attribute: str) -> None:
        text = " ".join(text.split())
        norm, reason = normalise_url(url, base)
        if norm is None:
            self.rejects.append((origin, reason, url[:200]))
            return
        key = uid(norm, text)
        if key in self.rows:
            self.rejects.append((origin, "duplicate", key))
            return
        self.rows[key] = (key, norm, text, page_url, origin, attribute)

    def reject(self, origin: str, reason: str, detail: str = "") -> None:
        self.rejects.append((origin, reason, detail[:500]))

    def write(self, outputs: dict[str, str]) -> dict:
        rows = list(self.rows.values())
        cols = list(zip(*rows)) if rows else [[]] * len(CANDIDATES_SCHEMA)
        write_parquet(pa.table(dict(zip(CANDIDATES_SCHEMA.names, cols)), schema=CANDIDATES_SCHEMA),
                      outputs["candidates"])
        rcols = list(zip(*self.rejects)) if self.rejects else [[]] * 3
        write_parquet(pa.table(dict(zip(REJECTS_SCHEMA.names, rcols)), schema=REJECTS_SCHEMA),
                      outputs["rejects"])
        return {"candidates": len(rows), "rejects": len(self.rejects)}
