"""`wit stats`: the built-in reports, each a plain .sql file in wit_builder/reports/ that users can
read and copy. A run's own `reports/` folder and any `--reports DIR` add more."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb

from . import sql

BUILTIN = Path(__file__).parent / "reports"


def report_files(run_dir: Path, extra: list[Path]) -> list[Path]:
    files = sorted(BUILTIN.glob("*.sql"))
    for folder in [run_dir / "reports", *extra]:
        files += sorted(folder.glob("*.sql"))
    return files


def title_of(path: Path) -> str:
    first = path.read_text().splitlines()[0] if path.stat().st_size else ""
    return first[2:].strip() if first.startswith("--") else path.stem


def run_reports(run_dir: Path, extra: list[Path] | None = None):
    """(title, relation or why it is not available yet) for every report file."""
    con = sql.connect(run_dir)
    available = set(sql.views(con))
    for path in report_files(run_dir, extra or []):
        query = path.read_text()
        missing = sorted(v for v in sql.VIEWS if re.search(rf"\b{v}\b", query) and v not in available)
        if missing:
            yield title_of(path), f"not available yet: no {', '.join(missing)} in this run"
            continue
        try:
            yield title_of(path), con.sql(query)
        except duckdb.Error as e:
            yield title_of(path), f"error in {path}: {e}"
