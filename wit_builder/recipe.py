"""Recipes: one TOML file names a whole run. It is validated into typed settings here.

Relative paths in a recipe are relative to the recipe file's own folder, so a recipe can be run from
anywhere. `run.root` (where run folders go) is the exception: it is relative to the current folder.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import storage
from .errors import WitError


class _Section(BaseModel):
    # A misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class RunSettings(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # A folder, or a prefix in an object store (s3://bucket/runs): the run folder is root/name.
    root: str = "runs"
    # For a root in a store: the local folder where each node stages the files it writes before
    # uploading them ("": ~/.cache/wit-builder/staging).
    staging: str = ""
    seed: int = 0
    executor: Literal["local", "ray"] = "local"
    # 0 means one worker per CPU core.
    workers: int = Field(default=0, ge=0)
    # Empty: start a local Ray cluster; otherwise e.g. "auto" or "ray://head:10001".
    ray_address: str = ""


class QuotaSettings(_Section):
    """Per-source caps; the defaults are MetaCLIP's published split of 500,000 entries."""

    wordnet: int = Field(default=86_654, ge=0)
    unigram: int = Field(default=251_465, ge=0)
    bigram: int = Field(default=100_646, ge=0)
    title: int = Field(default=61_235, ge=0)


class QuerySettings(_Section):
    size: int = Field(default=500_000, ge=1)
    # MediaWiki XML dumps (.xml, .xml.bz2, multistream .xml.bz2 with its -index.txt.bz2 beside it).
    wikipedia: list[str] = []
    # A `word;count` or `word<TAB>count` table that replaces the dump's unigram counts.
    unigram_counts: str = ""
    # A WordNet 3.0 database folder; empty to leave WordNet out.
    wordnet: str = "/usr/share/wordnet"
    # Hourly pageview files (`project title views bytes`); empty to rank titles by in-dump links.
    pageviews: list[str] = []
    pageview_projects: list[str] = ["en", "en.m"]
    min_count: int = Field(default=100, ge=1)
    bigram_min_count: int = Field(default=100, ge=1)
    min_pmi: float = 8.0
    title_min_views: int = Field(default=5, ge=0)
    title_min_inlinks: int = Field(default=2, ge=0)
    # Compressed MB of dump per partition, where a multistream index allows splitting a file. Small
    # enough that one partition's bigram counter fits a worker's memory.
    partition_mb: float = Field(default=16, gt=0)
    quota: QuotaSettings = QuotaSettings()


class CandidateSettings(_Section):
    # WARC (.warc, .warc.gz), Common Crawl WAT (.wat.gz) and lists (.parquet, .csv, .tsv, .jsonl).
    inputs: list[str] = []
    # Columns of tabular lists, as img2dataset names them.
    url_col: str = "url"
    caption_col: str = "caption"
    # Keep only the first text seen for each image URL.
    one_text_per_url: bool = False
    # Rows per partition: a big list is split by parquet row groups or, for CSV/TSV/JSONL, by byte
    # ranges at line starts, so that `run.workers` parallelises one file. WARC/WAT: one file each.
    partition_rows: int = Field(default=1_000_000, ge=1)
    # Buckets of the cross-partition duplicate shuffle; 0: one per GB of input.
    buckets: int = Field(default=0, ge=0)


BOILERPLATE = [
    "image", "images", "img", "photo", "photos", "picture", "pic", "logo", "icon", "spacer",
    "thumbnail", "thumb", "click here", "click to enlarge", "banner", "button", "avatar",
    "placeholder", "untitled", "null", "none", "undefined", "blank", "pixel", "spacer gif",
    "image not found", "no image", "loading", "arrow", "bullet", "divider", "advertisement", "ad",
    "more", "read more", "default", "alt", "alt text", "photo credit", "featured image",
]


class FilterSettings(_Section):
    min_chars: int = Field(default=5, ge=0)
    min_words: int = Field(default=1, ge=0)
    max_chars: int = Field(default=1000, ge=1)
    # Whole-text matches (case-insensitive, surrounding punctuation ignored) that are dropped.
    boilerplate: list[str] = BOILERPLATE
    # Repair mojibake with ftfy before every other rule.
    fix_text: bool = True
    # ISO 639-1 codes to keep, judged offline by py3langid; empty keeps every language.
    languages: list[str] = []
    # A text is dropped for language only when the detector is at least this sure.
    min_language_confidence: float = Field(default=0.8, ge=0, le=1)


class MatchSettings(_Section):
    mode: Literal["words", "metaclip"] = "words"
    # Captions per call of the matcher.
    batch_size: int = Field(default=200_000, ge=1)


class DownloadSettings(_Section):
    """img2dataset's own settings pass straight through; the rest is the egress policy."""

    thread_count: int = Field(default=64, ge=1)
    timeout: int = Field(default=10, ge=1)  # img2dataset's, per socket read
    retries: int = Field(default=0, ge=0)  # img2dataset's, immediate
    # Later passes over the samples that failed for a retryable reason (timeouts, 5xx, 429, resets).
    retry_passes: int = Field(default=1, ge=0)
    retry_delay_s: float = Field(default=2.0, ge=0)
    image_size: int = Field(default=256, ge=1)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "keep_ratio"
    resize_only_if_bigger: bool = True
    min_image_size: int = Field(default=0, ge=0)
    max_image_area: float = float("inf")
    max_aspect_ratio: float = float("inf")
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(default=95, ge=0, le=100)
    user_agent_token: str = "wit-builder"
    disallowed_header_directives: list[str] = ["noai", "noimageai", "noindex", "noimageindex"]
    # Decompression bombs: images with more pixels are refused before a full decode (OpenCV's cap).
    max_pixels: int = Field(default=89_478_485, ge=1)
    samples_per_shard: int = Field(default=1000, ge=1)  # img2dataset's shard: the unit of resume
    # Egress policy, enforced by the proxy on every hop.
    allow_loopback: bool = False
    # Networks (CIDRs) to fetch from although private, such as a NAS or an object store inside
    # 10.0.0.0/8. Link-local needs a network inside 169.254/16 or fe80::/10 listed, the cloud
    # metadata address needs itself (a /32 or /128); loopback is allow_loopback's alone.
    allow_networks: list[str] = []
    deadline_s: float = Field(default=30.0, gt=0)  # whole request, not per read
    max_bytes: int = Field(default=20 << 20, ge=1)
    per_host_connections: int = Field(default=16, ge=1)
    per_host_rps: float = Field(default=0.0, ge=0)  # 0: no rate limit
    respect_robots_txt: bool = True  # each site's robots.txt, for user_agent_token and img2dataset
    opt_out_domains: list[str] = []  # a domain and its subdomains
    opt_out_urls: list[str] = []
    # A miniature web: serve these WARC captures (and the fault routes) on 127.0.0.1 and send every
    # host name there. For the demo and tests; needs allow_loopback.
    replay: list[str] = []

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ValueError(f"{value!r} is not a network: write a CIDR such as 10.0.0.0/8 or fd00::/8") from None
        return values

    @model_validator(mode="after")
    def _replay_needs_loopback(self) -> "DownloadSettings":
        if self.replay and not self.allow_loopback:
            raise ValueError("download.replay serves on 127.0.0.1: set download.allow_loopback = true")
        return self


class EvalSet(_Section):
    name: str
    kind: Literal["folder", "webdataset", "fashion-mnist"]
    path: str


class DedupSettings(_Section):
    # Near duplicates: pHash Hamming distance <= radius (of 64 bits). The fast hash differs from a
    # full-decode imagehash by about half a bit on average, well inside the default.
    radius: int = Field(default=4, ge=0, le=16)
    eval_sets: list[EvalSet] = []
    # Buckets of the dedup shuffle; 0: sized from the image count, about 8M hash records each.
    buckets: int = Field(default=0, ge=0)


class BalanceSettings(_Section):
    # At most about t pairs per query (MetaCLIP: 20,000 for 400M pairs).
    t: int = Field(default=20_000, ge=1)
    # Before download, keep each query to about t * oversample candidates at the text level, so a
    # web-scale run does not fetch images it will throw away. 0 turns the cap off. The default allows
    # for the ~50% of candidates that fail to download or are duplicates (bench/README.md).
    oversample: float = Field(default=2.5, ge=0)


class ShardSettings(_Section):
    # Shards hold at most about samples_per_shard samples and max_shard_mb, whichever is fewer.
    samples_per_shard: int = Field(default=10_000, ge=1)
    max_shard_mb: float = Field(default=1024.0, gt=0)
    # Buckets of the shard shuffle (each holds its samples in memory to order them); 0: sized from
    # the kept bytes, about 256 MB each.
    buckets: int = Field(default=0, ge=0)


class Recipe(_Section):
    run: RunSettings
    queries: QuerySettings = QuerySettings()
    candidates: CandidateSettings = CandidateSettings()
    filter: FilterSettings = FilterSettings()
    match: MatchSettings = MatchSettings()
    download: DownloadSettings = DownloadSettings()
    dedup: DedupSettings = DedupSettings()
    balance: BalanceSettings = BalanceSettings()
    shards: ShardSettings = ShardSettings()

    # Where the recipe was read from; paths in it are relative to this folder.
    base_dir: str = Field(default=".", exclude=True)

    @field_validator("run")
    @classmethod
    def _workers_default(cls, run: RunSettings) -> RunSettings:
        if run.workers == 0:
            return run.model_copy(update={"workers": os.cpu_count() or 1})
        return run

    @model_validator(mode="after")
    def _check_sources(self) -> "Recipe":
        q = self.queries
        if not (q.wikipedia or q.unigram_counts or q.wordnet):
            raise ValueError("queries: name at least one of wikipedia, unigram_counts or wordnet")
        return self

    def path(self, value: str) -> Path | str:
        """Resolve a path from the recipe against the recipe's folder; an object-store URL (s3://...)
        stays as it is."""
        if storage.is_object_url(value):
            return value
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (Path(self.base_dir) / p).resolve()

    def paths(self, values: list[str], key: str) -> list[str]:
        """Resolve a list of paths, expanding glob patterns (sorted, so the order is stable)."""
        out = []
        for value in values:
            path = str(self.path(value))
            if any(c in path for c in "*?["):
                matches = storage.glob(path) if storage.is_object_url(path) else sorted(glob.glob(path))
                if not matches:
                    raise WitError(f"no file matches {value!r}", where=f"recipe {key}")
                out += matches
            else:
                out.append(path)
        return out

    def missing_inputs(self, stages: list[str]) -> list[str]:
        """Every input path of the recipe that the given stages read and that does not exist, as
        `key: path` lines: checked before any stage runs, so a typo costs seconds, not hours."""
        q, problems = self.queries, []

        def check(key: str, path: str | Path, kind: str = "file") -> None:
            if storage.is_object_url(str(path)):
                try:
                    if not storage.is_file(str(path)):
                        problems.append(f"{key}: {path}: object not found")
                except WitError as e:
                    problems.append(f"{key}: {e}")
                return
            p = Path(path)
            if not (p.is_file() if kind == "file" else p.is_dir()):
                problems.append(f"{key}: {path}: {kind} not found")

        def each(key: str, values: list[str]) -> list[str]:
            try:
                return self.paths(values, key)
            except WitError as e:
                problems.append(f"{key}: {e}")
                return []

        if "queries" in stages:
            for key in ("wikipedia", "pageviews"):
                for path in each(f"queries.{key}", getattr(q, key)):
                    check(f"queries.{key}", path)
            if q.unigram_counts:
                check("queries.unigram_counts", self.path(q.unigram_counts))
            if q.wordnet:
                check("queries.wordnet (WordNet's data.noun)", self.path(q.wordnet) / "data.noun")
        if "candidates" in stages:
            for path in each("candidates.inputs", self.candidates.inputs):
                check("candidates.inputs", path)
        if "download" in stages:
            for path in each("download.replay", self.download.replay):
                check("download.replay", path)
        if "dedup" in stages:
            for e in self.dedup.eval_sets:
                path = self.path(e.path)
                try:
                    found = storage.exists(path) if storage.is_object_url(str(path)) else path.exists()
                except WitError as err:
                    problems.append(f"dedup.eval_sets {e.name}: {err}")
                    continue
                if not found:
                    problems.append(f"dedup.eval_sets {e.name}: {path}: not found")
        return problems

    @property
    def run_dir(self) -> Path:
        """The run folder; for a run in a store, its local staging folder (see workspace)."""
        if self.run_store:
            staging = self.run.staging or os.path.join(os.path.expanduser("~"), ".cache", "wit-builder", "staging")
            return Path(staging).resolve() / self.run_store.split("://", 1)[1]
        return Path(self.run.root).resolve() / self.run.name

    @property
    def run_store(self) -> str:
        """The run folder's URL when `run.root` is in an object store, else ""."""
        if storage.is_object_url(self.run.root):
            return self.run.root.rstrip("/") + "/" + self.run.name
        return ""

    def resolved_toml(self) -> str:
        """The recipe with every default filled in and every input path made absolute."""
        data = self.model_dump(mode="json")
        q = data["queries"]
        q["wikipedia"] = self.paths(q["wikipedia"], "queries.wikipedia")
        q["pageviews"] = self.paths(q["pageviews"], "queries.pageviews")
        data["candidates"]["inputs"] = self.paths(data["candidates"]["inputs"], "candidates.inputs")
        data["download"]["replay"] = self.paths(data["download"]["replay"], "download.replay")
        for key in ("unigram_counts", "wordnet"):
            if q[key]:
                q[key] = str(self.path(q[key]))
        if not self.run_store:
            data["run"]["root"] = str(Path(self.run.root).resolve())
        return tomli_w.dumps(data)


def load_recipe(path: str | os.PathLike, overrides: dict | None = None) -> Recipe:
    """Read and validate a recipe; every problem names the file and the key."""
    text = None
    if storage.is_object_url(str(path)):  # a run folder's recipe.toml in a store
        try:
            text = storage.read_bytes(str(path))
        except FileNotFoundError:
            raise WitError("recipe file not found", where=str(path)) from None
    path = Path(path)
    try:
        raw = tomllib.loads((text if text is not None else path.read_bytes()).decode("utf-8"))
    except FileNotFoundError:
        raise WitError("recipe file not found", where=str(path)) from None
    except UnicodeDecodeError as e:
        raise WitError(f"not UTF-8 text (byte {e.start})", where=str(path)) from None
    except tomllib.TOMLDecodeError as e:
        raise WitError(f"not valid TOML: {e}", where=str(path)) from None
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        raw.setdefault(section, {})[key] = value
    raw["base_dir"] = str(path.resolve().parent) if text is None else "."
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key" + _allowed_keys(err["loc"])
            problems.append(f"  {key}: {msg} (got {err.get('input')!r})")
        raise WitError("invalid recipe:\n" + "\n".join(problems), where=str(path)) from None


def _allowed_keys(loc: tuple) -> str:
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(
            field.annotation, BaseModel
        ):
            return ""
        model = field.annotation
    names = [n for n, f in model.model_fields.items() if not f.exclude]
    return "; allowed: " + ", ".join(names)

