"""Download: the images of the matched pairs, through img2dataset, behind the egress proxy.

Per matched partition:
- `download/part-<key>.parquet`: one row per sample, successes and failures alike (uid, url, status,
  reason, error_message, http_status, attempts, width, height, original sizes, sha256, bytes);
- `download/images/part-<key>.parquet`: uid, sha256 and the image bytes of the successes.

Why parquet with bytes rather than img2dataset's WebDataset output: dedup reads the images and their
hashes column-wise and by uid, and the shard stage shuffles globally across partitions, so it rewrites
every tar anyway; parquet also gives DuckDB the per-sample status for free.

img2dataset runs one partition at a time into a work folder with its incremental mode and shards of
`samples_per_shard`: a run killed mid-partition fetches again only the shards it had not finished,
and the partition's outputs appear, atomically, only when every pass is done. Samples that failed for a
retryable reason are fetched again in later passes; `attempts` says how many were made.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import itertools
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from wit_builder.recipe import Section, input_path
from wit_builder.runner import Manifest, die_with_parent, step_info
from wit_builder.stage import Plot, Stage, View
from wit_builder.workspace import Run, atomic_write_bytes, file_identity, parquet_writer, read_table, write_parquet

from ..phash import phash_bytes
from ..sampling import keep_rows, read_counts
from ..urls import idna_host, normalise_url
from . import robots
from .egress import EgressProxy, Policy

log = logging.getLogger("wit")
VERSION = 2

STATUS_SCHEMA = pa.schema([
    ("uid", pa.string()), ("url", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("error_message", pa.string()), ("http_status", pa.int32()), ("attempts", pa.int32()),
    ("width", pa.int32()), ("height", pa.int32()), ("original_width", pa.int32()),
    ("original_height", pa.int32()), ("sha256", pa.string()), ("phash", pa.uint64()), ("bytes", pa.int64()),
])
IMAGES_SCHEMA = pa.schema([("uid", pa.string()), ("sha256", pa.string()), ("image", pa.binary())])
RETRYABLE = {"timeout", "connection_error", "deadline", "upstream_error", "host_busy", "host_rate_limited",
             "truncated", "http_429", "http_500", "http_502", "http_503", "http_504", "connect_failed"}
PROXY_VARS = ("http_proxy", "https_proxy", "ftp_proxy", "HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY")


def classify(status: str, error: str | None) -> tuple[str, str | None, int | None]:
    """(status, reason, http_status) from img2dataset's status and error message."""
    if status == "success":
        return "success", None, 200
    error = error or ""
    if m := re.search(r"wit-refused (\w+)", error):
        return "refused", m.group(1), None
    # urllib follows redirects to http, https and ftp only; to any other scheme (file:, gopher:,
    # data:, ...) it raises "HTTP Error 302: Found - Redirection to url '...' is not allowed". The
    # proxy refuses those for plain http; this is the same refusal behind an https tunnel.
    if m := re.match(r"HTTP Error (\d+): .* - Redirection to url .* is not allowed$", error, re.S):
        return "refused", "bad_scheme", int(m.group(1))
    if m := re.match(r"HTTP Error (\d+)", error):
        return "failed", f"http_{m.group(1)}", int(m.group(1))
    low = error.lower()
    if "x-robots-tag" in low:
        return "refused", "opt_out_header", 200
    if "incompleteread" in low or "incomplete read" in low:
        return "failed", "truncated", 200
    if "timed out" in low or "timeout" in low:
        return "failed", "timeout", None
    if "image_pixels" in low or "cv_io_max_image_pixels" in low or "decompression bomb" in low:
        return "failed", "too_many_pixels", 200
    if "too small" in low or "image too" in low or "aspect ratio" in low:
        return "failed", "size_rules", 200
    if "decod" in low:
        return "failed", "decode_error", 200
    if "urlopen error" in low or "connection" in low or "errno" in low:
        return "failed", "connection_error", None
    return "failed", "other", None


def opt_out_set(urls: list[str]) -> set[str]:
    """The recipe's opt-out URLs as the candidates stage writes URLs, so that case, a default port, a
    fragment or a Unicode host name in the recipe does not let an image through."""
    return {normalise_url(u)[0] or u for u in urls}


def pre_refusal(url: str, opt_out_domains: list[str], opt_out_urls: set[str]) -> str | None:
    """Refusals decided before any request: schemes other than http(s), and the recipe's opt-outs."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return "bad_scheme"
    if url in opt_out_urls:  # both normalised: candidate URLs by the candidates stage, these by opt_out_set
        return "opt_out_url"
    host = idna_host(parts.hostname or "") or ""
    # A domain the recipe writes in Unicode (`bücher.example`) matches its IDNA form in the URL.
    if any(host == d or host.endswith("." + d) for d in map(_idna_domain, opt_out_domains)):
        return "opt_out_domain"
    return None


@functools.lru_cache(maxsize=4096)
def _idna_domain(domain: str) -> str:
    return idna_host(domain.strip().lstrip(".").rstrip(".")) or domain.lower()


@contextlib.contextmanager
def egress_environment(proxy_url: str, max_pixels: int):
    """Point every urllib request of img2dataset (and its worker processes) at the proxy."""
    saved = {k: os.environ.get(k) for k in (*PROXY_VARS, "no_proxy", "NO_PROXY",
                                             "OPENCV_IO_MAX_IMAGE_PIXELS", "NO_ALBUMENTATIONS_UPDATE")}
    os.environ.update({k: proxy_url for k in PROXY_VARS})
    os.environ.update({"no_proxy": "", "NO_PROXY": "", "OPENCV_IO_MAX_IMAGE_PIXELS": str(max_pixels),
                       "NO_ALBUMENTATIONS_UPDATE": "1"})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def egress_policy(s: DownloadSettings, route: tuple[str, int] | None = None) -> Policy:
    """The proxy's policy from the recipe's download settings."""
    return Policy(allow_loopback=s.allow_loopback,
                  allow_networks=tuple(ipaddress.ip_network(n, strict=False) for n in s.allow_networks),
                  deadline_s=s.deadline_s, max_bytes=s.max_bytes,
                  per_host_connections=s.per_host_connections, per_host_rps=s.per_host_rps, route=route)


@contextlib.contextmanager
def output_to(path: Path):
    """Send this process's stdout and stderr (file descriptors, so child processes too) to a file."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_img2dataset(rows: pa.Table, folder: Path, s: DownloadSettings, on_shard) -> None:
    """One img2dataset pass over (uid, url, text) rows. `on_shard(path)` is called with each output
    shard, in order, as soon as img2dataset has closed it (it writes the shard's stats file after), so
    work on one shard overlaps the download of the next."""
    import img2dataset

    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "input.parquet"
    if not source.exists():
        write_parquet(rows.select(["uid", "url", "text"]).rename_columns(["uid", "url", "caption"]), source)
    out = folder / "out"
    seen: set[str] = set()

    def look() -> None:
        for stats in sorted(out.glob("*_stats.json")):
            if stats.name not in seen:
                on_shard(out / stats.name.replace("_stats.json", ".parquet"))
                seen.add(stats.name)

    def watch() -> None:
        while not done.wait(0.2):
            look()

    done = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        # It prints; the outcomes are in its parquet.
        with output_to(folder / "img2dataset.log"):
            img2dataset.download(
                url_list=str(source), input_format="parquet", url_col="url", caption_col="caption",
                save_additional_columns=["uid"], output_format="parquet", output_folder=str(out),
                processes_count=1, thread_count=s.thread_count, timeout=s.timeout,
                retries=s.retries, image_size=s.image_size, resize_mode=s.resize_mode,
                resize_only_if_bigger=s.resize_only_if_bigger, min_image_size=s.min_image_size,
                max_image_area=s.max_image_area, max_aspect_ratio=s.max_aspect_ratio,
                encode_format=s.encode_format, encode_quality=s.encode_quality,
                user_agent_token=s.user_agent_token,
                disallowed_header_directives=s.disallowed_header_directives,
                number_sample_per_shard=s.samples_per_shard, incremental_mode="incremental",
                compute_hash="sha256", extract_exif=False, enable_wandb=False,
            )
    finally:
        done.set()
        watcher.join()
    look()
    shards = sorted(out.glob("*.parquet"))
    expected = -(-rows.num_rows // s.samples_per_shard)
    if len(shards) != expected:  # img2dataset does not raise when a shard fails
        raise RuntimeError(f"img2dataset wrote {len(shards)} of {expected} shards in {out}")


def shard_hashes(path: str, column: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(pHashes, decodes) of rows [start, stop) of one img2dataset shard's images; failed samples
    have no image and do not decode."""
    t = read_table(path, columns=["status", column]).slice(start, stop - start)
    return phash_bytes([b if st == "success" and b else b"" for st, b in
                        zip(t.column("status").to_pylist(), t.column(column).to_pylist())])


def hashing_process(parent: int, requests, answers) -> None:
    """A pHash process: hashes the slices of shards it is sent until its parent closes its end of
    `requests` or dies (then the kernel kills it, or the pipe ends). It runs at a lower priority: the
    download is the bottleneck, so the hashes take the CPU its processes leave idle and catch up at
    the end of a partition, rather than slowing it."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the parent's to handle; this ends with it
    os.nice(10)
    phash_bytes([b""])  # its lazy imports, before the first shard
    while True:
        try:
            token, args = requests.recv()
        except (EOFError, OSError):
            return
        try:
            answer = (token, shard_hashes(*args), None)
        except Exception:
            answer = (token, None, traceback.format_exc())
        try:
            answers.send(answer)
        except OSError:
            return


class HashingProcess:
    """One pHash process and its two pipes, whose far ends it alone holds (a spawned process inherits
    only what it is given): each side sees the other's death as the end of a pipe, and none waits for
    ever on a pipe that another process holds open."""

    tokens = itertools.count()

    def __init__(self, context):
        requests, self.requests = context.Pipe(duplex=False)
        self.answers, answers = context.Pipe(duplex=False)
        self.process = context.Process(target=hashing_process, args=(os.getpid(), requests, answers),
                                       name="phash", daemon=True)
        self.process.start()
        requests.close()
        answers.close()
        self.done: dict[int, tuple] = {}  # answers read while waiting for another
        self.lock = threading.Lock()

    def submit(self, *args) -> int:
        from concurrent.futures.process import BrokenProcessPool

        token = next(self.tokens)
        try:
            self.requests.send((token, args))
        except OSError:
            raise BrokenProcessPool(f"pHash process {self.process.pid} has ended") from None
        return token

    def result(self, token: int):
        from concurrent.futures.process import BrokenProcessPool

        with self.lock:
            while token not in self.done:
                try:
                    got, value, error = self.answers.recv()
                except (EOFError, OSError):
                    raise BrokenProcessPool(f"pHash process {self.process.pid} has ended") from None
                self.done[got] = (value, error)
            value, error = self.done.pop(token)
        if error:
            raise RuntimeError(f"pHash process {self.process.pid} failed:\n{error}")
        return value

    def stop(self) -> None:
        """Close its pipe: it ends once it has answered what it was sent."""
        self.requests.close()


class ShardHashing:
    """pHashes of img2dataset's shards, computed in processes of their own while img2dataset
    downloads the next shard: Pillow's decoding holds the GIL, which the proxy's threads need, and a
    partition's last shard, which nothing overlaps, is split across all the processes."""

    processes = 2
    _pool: list[HashingProcess] | None = None  # kept for the life of this process: starting one costs about a second
    _finalizer = None

    def __init__(self, encode_format: str):
        self.column = encode_format
        self.pending: dict[Path, list] = {}
        self.workers = self.pool()  # started here, in the task's thread, not img2dataset's shard watcher

    @classmethod
    def pool(cls) -> list[HashingProcess]:
        """The processes, started from the calling thread if they are not running: the kernel's
        parent-death signal comes when the thread that started a process ends, so it must be one that
        lasts (the task's)."""
        import multiprocessing.util

        if cls._pool is None or not all(w.process.is_alive() for w in cls._pool):
            cls.discard()
            context = multiprocessing.get_context("spawn")
            cls._pool = [HashingProcess(context) for _ in range(cls.processes)]
            if cls._finalizer is None:
                # A runner's worker process waits for its children as it exits: let these end first
                # (they are daemons too, terminated before that wait if still busy).
                cls._finalizer = multiprocessing.util.Finalize(None, cls.discard, exitpriority=100)
        return cls._pool

    @classmethod
    def discard(cls) -> None:
        for worker in cls._pool or ():
            worker.stop()
        cls._pool = None

    def submit(self, shard: Path) -> None:
        import pyarrow.parquet as pq

        cuts = np.linspace(0, pq.read_metadata(shard).num_rows, self.processes + 1).astype(int)
        self.pending[shard] = [w.submit(str(shard), self.column, a, b)
                               for w, a, b in zip(self.workers, cuts[:-1], cuts[1:])]

    def result(self, shard: Path) -> tuple[np.ndarray, np.ndarray]:
        from concurrent.futures.process import BrokenProcessPool

        try:
            parts = [w.result(token) for w, token in zip(self.workers, self.pending.pop(shard))]
        except BrokenProcessPool:  # a process died (killed, out of memory): new ones next time
            if type(self)._pool is self.workers:
                type(self).discard()
            raise
        return np.concatenate([h for h, _ in parts]), np.concatenate([ok for _, ok in parts])


def pre_cap(rows: pa.Table, counts: str, cap: float, seed: int) -> np.ndarray:
    """The pre-download cap: balancing's rule at t * oversample, on the text-level match counts."""
    return keep_rows(rows.column("uid"), rows.column("query_ids"), read_counts(counts), cap, seed)


@contextlib.contextmanager
def reporting(path: str, proxy: EgressProxy, decided: dict, total: int, every: float = 2.0):
    """While the block runs, rewrite `path` every few seconds with the partition's progress: the
    samples `decided` before any image request, then each final answer the proxy gives from here on
    (a retried sample may count twice; the driver caps it at the partition's size)."""
    halt = threading.Event()
    before = dict(proxy.answers)  # robots.txt requests are not samples
    refused: dict[str, int] = {}
    for r in decided.values():
        if r["status"] == "refused":
            refused[r["reason"]] = refused.get(r["reason"], 0) + 1

    def write() -> None:
        answers = {k: v - before.get(k, 0) for k, v in dict(proxy.answers).items()}
        failures = {k: v for k, v in answers.items() if k not in ("ok", "https") and v}
        for reason, n in refused.items():
            failures[reason] = failures.get(reason, 0) + n
        body = {"done": min(total, len(decided) + sum(answers.values())), "ok": answers.get("ok", 0),
                "failures": failures}
        atomic_write_bytes(path, json.dumps(body).encode())

    def loop() -> None:
        while not halt.wait(every):
            write()

    thread = threading.Thread(target=loop, daemon=True)
    if path:
        write()
        thread.start()
    try:
        yield
    finally:
        halt.set()
        if path:
            thread.join()


def download_part(matched: str, settings: DownloadSettings, work: str, outputs: dict, counts: str = "",
                  cap: float = 0, seed: int = 0, progress: str = "", robots_cache: str | None = None) -> dict:
    s = settings
    rows = read_table(matched, columns=["uid", "url", "text", "query_ids"])
    uids, urls = rows.column("uid").to_pylist(), rows.column("url").to_pylist()
    records: dict[str, dict] = {}
    if cap and rows.num_rows:
        for uid, keep in zip(uids, pre_cap(rows, counts, cap, seed)):
            if not keep:
                records[uid] = {"status": "skipped", "reason": "pre_balance_cap", "attempts": 0}
    opt_urls = opt_out_set(s.opt_out_urls)
    domains = [d.lower().lstrip(".") for d in s.opt_out_domains]
    for uid, url in zip(uids, urls):
        if uid not in records and (reason := pre_refusal(url, domains, opt_urls)):
            records[uid] = {"status": "refused", "reason": reason, "attempts": 0}
    pending = rows.filter(pa.array([u not in records for u in uids], pa.bool_()))

    web = contextlib.nullcontext()
    if s.replay:
        from .miniweb import MiniWeb

        web = MiniWeb(s.replay)
    resumed = 0
    # Images stream out one img2dataset shard at a time, so memory stays at one shard's images
    # however big the partition.
    position = {u: i for i, u in enumerate(uids)}
    hashing = ShardHashing(s.encode_format)
    with web as mini, parquet_writer(outputs["images"], IMAGES_SCHEMA) as images:
        with EgressProxy(egress_policy(s, mini.address if mini else None)) as proxy, \
                egress_environment(proxy.url, s.max_pixels):
            if s.respect_robots_txt and pending.num_rows:
                refused = robots.disallowed(pending.column("url").to_pylist(), proxy.url, s.user_agent_token,
                                            s.deadline_s, cache=robots_cache)
                for i, why in refused.items():
                    records[pending.column("uid")[i].as_py()] = {"status": "refused", "reason": "robots_txt",
                                                                 "error_message": why, "attempts": 0}
                pending = pending.filter(pa.array([i not in refused for i in range(pending.num_rows)], pa.bool_()))
            with reporting(progress, proxy, dict(records), rows.num_rows):
                for attempt in range(1, s.retry_passes + 2):
                    if pending.num_rows == 0:
                        break
                    if attempt > 1:
                        time.sleep(s.retry_delay_s)
                    folder = Path(work) / f"pass-{attempt}"
                    resumed += len(list((folder / "out").glob("*_stats.json")))  # shards a killed run finished
                    download_pass(pending, folder, s, attempt, hashing, position, records, images)
                    retry = [records.get(u, {}).get("reason") in RETRYABLE for u in pending.column("uid").to_pylist()]
                    pending = pending.filter(pa.array(retry, pa.bool_()))

    status_rows = [{"uid": u, "url": url, **records.get(u, {"status": "failed", "reason": "missing"})}
                   for u, url in zip(uids, urls)]
    write_parquet(pa.Table.from_pylist(status_rows, schema=STATUS_SCHEMA), outputs["status"])
    # img2dataset's own log of every pass, kept beside the partition's outputs.
    logs = sorted(Path(work).glob("pass-*/img2dataset.log"))
    atomic_write_bytes(outputs["log"], b"".join(f"--- {p.parent.name}\n".encode() + p.read_bytes() for p in logs))
    shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(OSError):
        Path(work).parent.rmdir()  # the _work folder, once no partition is under way
    by_status: dict[str, int] = {}
    for r in status_rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    return {"samples": len(status_rows), "resumed_shards": resumed, **by_status}


def download_pass(rows: pa.Table, folder: Path, s: DownloadSettings, attempt: int, hashing: ShardHashing,
                  position: dict, records: dict, images) -> None:
    """One img2dataset pass over `rows`. Each shard is finished (its hashes collected, its outcomes
    recorded, its images written) by one thread while img2dataset downloads the next, in img2dataset's
    order: what is left after the pass is its last shard, not the whole partition."""

    def finish(path: Path) -> None:
        hashes, ok = hashing.result(path)
        shard = read_table(path).append_column("phash", pa.array(hashes)).append_column("decodes", pa.array(ok))
        # img2dataset writes a shard's rows in the order its threads finish: put them in input order.
        order = np.argsort([position[u] for u in shard.column("uid").to_pylist()], kind="stable")
        record_shard(shard.take(pa.array(order)), attempt, s.encode_format, records, images)

    with ThreadPoolExecutor(1, thread_name_prefix="finish") as finisher:
        finishing = []

        def on_shard(path: Path) -> None:
            hashing.submit(path)
            finishing.append(finisher.submit(finish, path))

        run_img2dataset(rows, folder, s, on_shard)
        for f in finishing:
            f.result()


def record_shard(shard: pa.Table, attempt: int, encode_format: str, records: dict, images) -> None:
    """Record the outcome of every sample of one img2dataset shard, with its pHash, and write its good
    images to the images file (a successful image is one that decodes)."""
    kept = []
    for r in shard.to_pylist():
        image = r.get(encode_format) if r["status"] == "success" else None
        status, reason, http_status = classify(r["status"], r["error_message"])
        if status == "success" and not (image and r["decodes"]):
            status, reason = "failed", "undecodable"
        rec = {"status": status, "reason": reason, "http_status": http_status,
               "error_message": r["error_message"], "attempts": attempt}
        if status == "success":
            rec.update(width=r["width"], height=r["height"], sha256=r["sha256"], phash=r["phash"],
                       original_width=r["original_width"], original_height=r["original_height"],
                       bytes=len(image))
            kept.append((r["uid"], r["sha256"], image))
        records[r["uid"]] = rec
    if kept:
        uid, sha, image = zip(*kept)
        images.write_table(pa.table({"uid": uid, "sha256": sha, "image": image}, schema=IMAGES_SCHEMA))


class DownloadSettings(Section):
    """img2dataset's own settings pass straight through; the rest is the egress policy."""

    thread_count: int = Field(default=64, ge=1)
    """img2dataset's download threads per task."""
    timeout: int = Field(default=10, ge=1)
    """Seconds img2dataset waits on one socket read."""
    retries: int = Field(default=0, ge=0)
    """img2dataset's immediate retries of a failed request."""
    retry_passes: int = Field(default=1, ge=0)
    """Later passes over the samples that failed for a retryable reason (timeouts, 5xx, 429, resets)."""
    retry_delay_s: float = Field(default=2.0, ge=0)
    """Seconds between retry passes."""
    image_size: int = Field(default=256, ge=1)
    """img2dataset's target side in pixels."""
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "keep_ratio"
    """img2dataset's resize mode."""
    resize_only_if_bigger: bool = True
    """Leave images smaller than image_size as they are."""
    min_image_size: int = Field(default=0, ge=0)
    """img2dataset refuses images whose shorter side is smaller."""
    max_image_area: float = float("inf")
    """img2dataset refuses images of more pixels than this."""
    max_aspect_ratio: float = float("inf")
    """img2dataset refuses images more elongated than this."""
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    """How the stored images are encoded."""
    encode_quality: int = Field(default=95, ge=0, le=100)
    """The stored images' encoding quality."""
    user_agent_token: str = "wit-builder"
    """The token in the User-Agent header, and the one robots.txt rules are matched against."""
    disallowed_header_directives: list[str] = ["noai", "noimageai", "noindex", "noimageindex"]
    """X-Robots-Tag directives that make img2dataset refuse an image."""
    max_pixels: int = Field(default=89_478_485, ge=1)
    """Decompression bombs: images with more pixels are refused before a full decode (OpenCV's cap)."""
    samples_per_shard: int = Field(default=1000, ge=1)
    """Samples per img2dataset shard inside a partition: the unit of resume."""
    allow_loopback: bool = False
    """Fetch from 127.0.0.1 and ::1 (the egress proxy enforces its policy on every hop)."""
    allow_networks: list[str] = []
    """Networks (CIDRs) to fetch from although private, such as a NAS or an object store inside 10.0.0.0/8.
    Link-local needs a network inside 169.254/16 or fe80::/10 listed, the cloud metadata address needs
    itself (a /32 or /128); loopback is allow_loopback's alone."""
    deadline_s: float = Field(default=30.0, gt=0)
    """Seconds for a whole request, redirects included, not per read."""
    max_bytes: int = Field(default=20 << 20, ge=1)
    """A response body larger than this is cut off and refused."""
    per_host_connections: int = Field(default=16, ge=1)
    """Connections open to one host at once."""
    per_host_rps: float = Field(default=0.0, ge=0)
    """Requests per second to one host; 0: no rate limit."""
    respect_robots_txt: bool = True
    """Each site's robots.txt, for user_agent_token and img2dataset."""
    opt_out_domains: list[str] = []
    """Domains never fetched from, with their subdomains."""
    opt_out_urls: list[str] = []
    """Image URLs never fetched."""
    replay: list[str] = input_path([])
    """A miniature web: serve these WARC captures (and the fault routes) on 127.0.0.1 and send every host name
    there. For the demo and tests; needs allow_loopback."""

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
    def _replay_needs_loopback(self) -> DownloadSettings:
        if self.replay and not self.allow_loopback:
            raise ValueError("download.replay serves on 127.0.0.1: set download.allow_loopback = true")
        return self


FUNNEL = "SELECT 'download ' || status AS step, reason, count(*) AS rows FROM downloads GROUP BY status, reason"


def _sizes_plot(con):
    import matplotlib.pyplot as plt

    sizes = con.execute("SELECT width, height FROM downloads WHERE status = 'success'").fetchall()
    if not sizes:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, i, name in ((axes[0], 0, "width"), (axes[1], 1, "height")):
        ax.hist([s[i] for s in sizes], bins=30, color="#55a868")
        ax.set_xlabel(f"{name} (px)")
    axes[0].set_ylabel("images")
    fig.suptitle("Stored image sizes")
    return fig


class DownloadStage(Stage):
    name = "download"
    needs = ("match",)
    settings = DownloadSettings
    provides = {"status": STATUS_SCHEMA, "images": IMAGES_SCHEMA, "log": None}
    views = (View("downloads", "download/part-*.parquet"), View("images", "download/images/part-*.parquet"))
    main_view = "downloads"
    funnel = FUNNEL
    kept = ("downloaded", "SELECT count(*) FROM downloads WHERE status = 'success'")
    plots = (Plot("Width and height of the stored images", "sizes", _sizes_plot, ("downloads",)),)
    unit = "sample"

    def empty_hint(self, probe) -> str | None:
        if probe.count("downloads", "status = 'success'"):
            return None
        hint = probe.top("downloads", "status <> 'success'")
        for reason, key in (("loopback_address", "download.allow_loopback"), ("timeout", "download.timeout")):
            if reason in hint:
                hint += f"; see {key}"
                break
        return f"all {probe.count('downloads')} downloads failed or were refused: {hint}"

    def plan(self, run: Run):
        up = self.needed(run, "match")
        settings = run.recipe.download
        settings = settings.model_copy(update={"replay": run.recipe.paths(settings.replay, "download.replay")})
        replay = [file_identity(p) for p in settings.replay]
        out = run.stage_dir(self.name)
        b = run.recipe.balance
        cap = b.t * b.oversample
        tasks = []
        for part in up.parts():
            key = part.key
            outputs = {"status": str(out / f"part-{key}.parquet"),
                       "images": str(out / "images" / f"part-{key}.parquet"),
                       "log": str(out / "logs" / f"part-{key}.log")}
            progress = str(run.marker_path(self.name, key)) + ".progress"
            tasks.append(self.task(
                run, key, download_part,
                kwargs={"matched": part.file("matched"), "settings": settings,
                        "work": str(out / "_work" / key), "outputs": outputs,
                        "counts": up.output("counts"), "cap": cap, "seed": run.recipe.run.seed,
                        "progress": progress, "robots_cache": str(out / "_robots")},
                outputs=list(outputs.values()),
                inputs={"version": VERSION, "upstream": part.fingerprint, "settings": settings.model_dump(mode="json"),
                        "replay": replay, "counts": up.fingerprint if cap else None, "cap": cap,
                        "seed": run.recipe.run.seed},
                weight=part.info.get("matched", 1) or 1, work=str(out / "_work" / key), progress=progress,
            ))
        yield tasks
        infos = step_info(tasks)
        return Manifest(self.name, [p.entry(t, t.kwargs["outputs"], {"success": i.get("success", 0)})
                                    for t, p, i in zip(tasks, up.parts(), infos)])
