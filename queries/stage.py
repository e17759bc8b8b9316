"""The query-list stage: count the dumps (a map over partitions), then merge every source into
`queries/queries.parquet` (a reduce).

Sources, in the order they are taken: WordNet, unigrams, bigrams, titles. An entry that several sources
propose appears once, at its first place, and lists all of them; each source fills its quota with
entries not already taken, so the quotas add up to the list's size as in MetaCLIP's split.
"""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import pyarrow as pa
from pydantic import Field, model_validator

from wit_builder import storage
from wit_builder.errors import WitError
from wit_builder.recipe import Recipe, Section, input_path, missing_file
from wit_builder.runner import Manifest, Task, partition_entry
from wit_builder.stage import Plot, Stage, View
from wit_builder.workspace import Run, atomic_write_bytes, duckdb_paths, file_identity, write_parquet

from .counting import OUTPUTS, count_part
from .dump import plan_parts
from .tables import read_pageviews, read_unigram_table
from .wordnet import DATA_FILES, wordnet_entries

SOURCES = ("wordnet", "unigram", "bigram", "title")
VERSION = 2  # 2: namespaces from <siteinfo>, decimals, markup dropped from the unigram table

QUERIES_SCHEMA = pa.schema([
    ("query_id", pa.int32()),
    ("query", pa.string()),
    ("sources", pa.list_(pa.string())),
    ("count", pa.int64()),
    ("pmi", pa.float64()),
    ("views", pa.int64()),
    ("inlinks", pa.int64()),
])


class QuotaSettings(Section):
    """Per-source caps; the defaults are MetaCLIP's published split of 500,000 entries."""

    wordnet: int = Field(default=86_654, ge=0)
    """WordNet synsets."""
    unigram: int = Field(default=251_465, ge=0)
    """Wikipedia words of count at least min_count."""
    bigram: int = Field(default=100_646, ge=0)
    """High-PMI Wikipedia bigrams."""
    title: int = Field(default=61_235, ge=0)
    """Wikipedia article titles."""


class QuerySettings(Section):
    size: int = Field(default=500_000, ge=1)
    """Entries in the query list (CLIP: 500,000)."""
    wikipedia: list[str] = input_path([])
    """MediaWiki XML dumps (.xml, .xml.bz2, multistream .xml.bz2 with its -index.txt.bz2 beside it)."""
    unigram_counts: str = input_path("")
    """A `word;count` or `word<TAB>count` table that replaces the dump's unigram counts."""
    wordnet: str = input_path("/usr/share/wordnet", kind="folder")
    """A WordNet 3.0 database folder; empty to leave WordNet out."""
    pageviews: list[str] = input_path([])
    """Hourly pageview files (`project title views bytes`); empty to rank titles by in-dump links."""
    pageview_projects: list[str] = ["en", "en.m"]
    """The pageview files' projects whose views count (English Wikipedia, desktop and mobile)."""
    min_count: int = Field(default=100, ge=1)
    """A word enters as a unigram query when it occurs at least this often (CLIP: 100)."""
    bigram_min_count: int = Field(default=100, ge=1)
    """A bigram is considered when it occurs at least this often."""
    min_pmi: float = 8.0
    """A bigram enters when its pointwise mutual information, in bits, is at least this high."""
    title_min_views: int = Field(default=5, ge=0)
    """With pageviews: an article title enters when it has at least this many views."""
    title_min_inlinks: int = Field(default=2, ge=0)
    """Without pageviews: an article title enters when at least this many in-dump links point to it."""
    partition_mb: float = Field(default=16, gt=0)
    """Compressed MB of dump per partition, where a multistream index allows splitting a file. Small enough
    that one partition's bigram counter fits a worker's memory."""
    quota: QuotaSettings = QuotaSettings()
    """Entries each source may take, in the order wordnet, unigram, bigram, title."""

    @model_validator(mode="after")
    def _one_source(self) -> QuerySettings:
        if not (self.wikipedia or self.unigram_counts or self.wordnet):
            raise ValueError("name at least one of wikipedia, unigram_counts or wordnet")
        return self


def _sources_plot(con):
    import matplotlib.pyplot as plt

    shares = con.execute("SELECT s, count(*) FROM (SELECT unnest(sources) s FROM queries) GROUP BY s "
                         "ORDER BY 2 DESC").fetchall()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([s for s, _ in shares], [n for _, n in shares], color="#8172b3")
    ax.set_ylabel("entries")
    ax.set_title("Query entries by source")
    return fig


class QueriesStage(Stage):
    name = "queries"
    settings = QuerySettings
    views = (View("queries", "queries/queries.parquet"), View("dump_errors", "queries/counts/*.errors.parquet"))
    main_view = "queries"
    plots = (Plot("The queries' share of sources", "sources", _sources_plot, ("queries",)),)

    def check_inputs(self, recipe: Recipe) -> list[str]:
        q = recipe.queries
        wordnet = [missing_file("queries.wordnet (WordNet's data.noun)", recipe.path(q.wordnet) / "data.noun")]
        return super().check_inputs(recipe) + [m for m in wordnet if m and q.wordnet]

    def plan(self, run: Run):
        """Count each dump partition, then merge the sources; the list is the output `queries`."""
        tasks = self.tasks(run)
        yield tasks
        reduce = self.reduce_task(run, tasks)
        yield [reduce]
        return Manifest(self.name, [partition_entry(t, t.kwargs["outputs"]) for t in tasks],
                        {"queries": reduce.outputs[0], "queries_txt": reduce.outputs[1]})

    def tasks(self, run: Run) -> list[Task]:
        q = run.recipe.queries
        tasks = []
        for path in run.recipe.paths(q.wikipedia, "queries.wikipedia"):
            for part in plan_parts(path, int(q.partition_mb * (1 << 20))):
                base = run.stage_dir("queries") / "counts" / part.key
                outputs = {name: f"{base}.{name}.parquet" for name in OUTPUTS}
                end = part.end if part.end is not None else storage.size(path)
                tasks.append(self.task(
                    run, part.key, count_part,
                    kwargs={"path": path, "start": part.start, "end": part.end, "outputs": outputs},
                    outputs=list(outputs.values()),
                    inputs={"version": VERSION, "file": file_identity(path), "start": part.start,
                            "end": part.end},
                    weight=end - part.start,
                ))
        return tasks

    def reduce_task(self, run: Run, tasks: list[Task]) -> Task:
        q = run.recipe.queries
        out_dir = run.stage_dir("queries")
        kwargs = {
            "counts": [t.kwargs["outputs"] for t in tasks],
            "unigram_table": str(run.recipe.path(q.unigram_counts)) if q.unigram_counts else "",
            "wordnet": str(run.recipe.path(q.wordnet)) if q.wordnet else "",
            "pageviews": run.recipe.paths(q.pageviews, "queries.pageviews"),
            "settings": q,
            "out_dir": str(out_dir),
        }
        # Settings less the paths, which enter as resolved (absolute): a saved recipe.toml gives the
        # same fingerprint.
        settings = q.model_dump(mode="json", exclude={"wikipedia", "pageviews", "unigram_counts", "wordnet"})
        inputs = {"version": VERSION, "settings": settings, "parts": [t.fingerprint for t in tasks],
                  "sources": [kwargs["unigram_table"], kwargs["wordnet"], kwargs["pageviews"]], "files": []}
        for f in [kwargs["unigram_table"], *kwargs["pageviews"]]:
            if f and storage.is_file(f):
                inputs["files"].append(file_identity(f))
        if kwargs["wordnet"]:
            inputs["files"] += [file_identity(Path(kwargs["wordnet"]) / n) for n in DATA_FILES
                                if (Path(kwargs["wordnet"]) / n).exists()]
        return self.task(run, "_reduce", build_query_list, kwargs=kwargs,
                         outputs=[str(out_dir / "queries.parquet"), str(out_dir / "queries.txt")], inputs=inputs)


def _dump_sources(con: duckdb.DuckDBPyConnection, counts: list[dict], s: QuerySettings, pageviews: dict | None):
    """Unigrams, bigrams (with PMI) and titles from the per-partition count files."""
    files = {name: duckdb_paths(con, [c[name] for c in counts]) for name in ("unigrams", "bigrams", "titles", "links")}
    con.execute("CREATE TEMP TABLE uni AS SELECT token, sum(count)::BIGINT AS count "
                "FROM read_parquet($f) GROUP BY token", {"f": files["unigrams"]})
    total = con.execute("SELECT coalesce(sum(count), 0) FROM uni").fetchone()[0]
    unigrams = con.execute(
        "SELECT token, count FROM uni WHERE count >= $m ORDER BY count DESC, token",
        {"m": s.min_count}).fetchall()
    # PMI in bits: log2( p(w1 w2) / (p(w1) p(w2)) ) with every p a count over the token total.
    bigrams = con.execute(
        """
        WITH b AS (SELECT w1, w2, sum(count)::BIGINT AS count FROM read_parquet($f)
                   GROUP BY w1, w2 HAVING sum(count) >= $m)
        SELECT b.w1 || ' ' || b.w2 AS bigram, b.count,
               log2(b.count::DOUBLE * $n / (u1.count::DOUBLE * u2.count)) AS pmi
        FROM b JOIN uni u1 ON u1.token = b.w1 JOIN uni u2 ON u2.token = b.w2
        WHERE log2(b.count::DOUBLE * $n / (u1.count::DOUBLE * u2.count)) >= $p
        ORDER BY pmi DESC, b.count DESC, bigram
        """,
        {"f": files["bigrams"], "m": s.bigram_min_count, "n": max(total, 1), "p": s.min_pmi},
    ).fetchall()
    inlinks = con.execute(
        """
        WITH t AS (SELECT DISTINCT title FROM read_parquet($t)),
             l AS (SELECT target, sum(count)::BIGINT AS n FROM read_parquet($l) GROUP BY target)
        SELECT t.title, coalesce(l.n, 0) FROM t LEFT JOIN l ON l.target = t.title
        """,
        {"t": files["titles"], "l": files["links"]},
    ).fetchall()
    if pageviews is not None:
        titles = [(t, pageviews.get(t, 0), n) for t, n in inlinks]
        titles = [x for x in titles if x[1] >= s.title_min_views]
        titles.sort(key=lambda x: (-x[1], -x[2], x[0]))
    else:
        titles = [(t, None, n) for t, n in inlinks if n >= s.title_min_inlinks]
        titles.sort(key=lambda x: (-x[2], x[0]))
    return total, unigrams, bigrams, titles


def build_query_list(counts: list[dict], unigram_table: str, wordnet: str, pageviews: list[str],
                     settings: QuerySettings, out_dir: str) -> dict:
    """The reduce: merge all sources under their quotas and write queries.parquet and queries.txt."""
    s = settings
    con = duckdb.connect()
    views = read_pageviews(pageviews, s.pageview_projects) if pageviews else None
    total, unigrams, bigrams, titles = _dump_sources(con, counts, s, views) if counts else (0, [], [], [])
    if unigram_table:
        table = read_unigram_table(unigram_table)
        unigrams = sorted(((w, c) for w, c in table.items() if c >= s.min_count),
                          key=lambda x: (-x[1], x[0]))

    # query -> [sources, count, pmi, views, inlinks]
    entries: dict[str, list] = {}
    quota = s.quota

    def offer(source: str, query: str, count=None, pmi=None, views=None, inlinks=None) -> None:
        entry = entries.get(query)
        if entry is not None:
            entry[0].append(source)
            entry[1] = entry[1] if entry[1] is not None else count
            entry[2] = entry[2] if entry[2] is not None else pmi
            entry[3] = entry[3] if entry[3] is not None else views
            entry[4] = entry[4] if entry[4] is not None else inlinks
        elif taken[source] < getattr(quota, source) and len(entries) < s.size:
            entries[query] = [[source], count, pmi, views, inlinks]
            taken[source] += 1

    taken = dict.fromkeys(SOURCES, 0)
    if wordnet:
        for e in wordnet_entries(wordnet):
            offer("wordnet", e)
    for word, c in unigrams:
        offer("unigram", word, count=c)
    for bigram, c, pmi in bigrams:
        offer("bigram", bigram, count=c, pmi=pmi if math.isfinite(pmi) else None)
    for title, v, n in titles:
        offer("title", title, views=v, inlinks=n)
    if not entries:
        raise WitError("the query list is empty: no source gave an entry above its threshold",
                       where="recipe [queries]")

    queries = list(entries)
    rows = list(entries.values())
    table = pa.table({
        "query_id": range(len(queries)),
        "query": queries,
        "sources": [r[0] for r in rows],
        "count": [r[1] for r in rows],
        "pmi": [r[2] for r in rows],
        "views": [r[3] for r in rows],
        "inlinks": [r[4] for r in rows],
    }, schema=QUERIES_SCHEMA)
    write_parquet(table, Path(out_dir) / "queries.parquet")
    atomic_write_bytes(Path(out_dir) / "queries.txt", "".join(q + "\n" for q in queries).encode())
    return {"entries": len(queries), "taken": taken, "tokens": total,
            "candidates": {"unigram": len(unigrams), "bigram": len(bigrams), "title": len(titles)}}
