"""`wit stats`: the built-in reports, each a plain .sql file in wit_builder/reports/ that users can
read and copy. A run's own `reports/` folder and any `--reports DIR` add more."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb

from . import sql, workspace
from .stage import views_named

BUILTIN = Path(__file__).parent / "reports"


def report_files(run_dir: Path, extra: list[Path]) -> list[Path]:
    files = sorted(BUILTIN.glob("*.sql"))
    for folder in [run_dir / "reports", *extra]:
        files += workspace.glob(folder, "*.sql")
    return files


def title_of(path: Path, query: str) -> str:
    first = query.splitlines()[0] if query else ""
    return first[2:].strip() if first.startswith("--") else path.stem


def run_reports(run_dir: Path, extra: list[Path] | None = None):
    """(title, relation or why it is not available yet) for every report file."""
    con = sql.connect(run_dir)
    available = set(sql.views(con))
    for path in report_files(run_dir, extra or []):
        query = workspace.read_bytes(path).decode()
        title = title_of(path, query)
        named = views_named(query) + (["funnel"] if re.search(r"\bfunnel\b", query) else [])
        missing = sorted(v for v in named if v not in available)
        if missing:
            yield title, f"not available yet: no {', '.join(missing)} in this run"
            continue
        try:
            yield title, con.sql(query)
        except duckdb.Error as e:
            yield title, f"error in {workspace.location(path)}: {e}"
