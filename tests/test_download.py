"""The download stage end to end: img2dataset over real HTTP through the egress proxy, against the
miniature web (real captures plus fault routes). Every fault becomes a row with a clear reason."""

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import tomli_w
from conftest import REPO, wit
from PIL import Image

from pipelines.download.miniweb import MiniWeb

ARCHIVE = REPO / "data" / "warc" / "aut-example-2008.warc.gz"
FAULTS = REPO / "pipelines" / "demo" / "faults.csv"


def archive_images(n: int) -> list[str]:
    with MiniWeb([ARCHIVE]) as web:
        return sorted(f"http://{h}{p}" for (h, p), (status, headers, body) in web.captures.items()
                      if status == 200 and body[:3] in (b"\xff\xd8\xff", b"GIF", b"\x89PN"))[:n]


def make_run(tmp_path, name, rows, download=None, workers=1, words=("a",)):
    listing = tmp_path / f"{name}.csv"
    listing.write_text("url,caption\n" + "".join(f"{u},{c}\n" for u, c in rows))
    table = tmp_path / "words.txt"
    table.write_text("".join(f"{w};1000\n" for w in words))
    recipe = tmp_path / f"{name}.toml"
    recipe.write_text(tomli_w.dumps({
        "run": {"name": name, "root": str(tmp_path / "runs"), "workers": workers},
        "queries": {"unigram_counts": str(table), "wordnet": ""},
        "candidates": {"inputs": [str(listing)]},
        "download": {"thread_count": 8, "timeout": 2, "deadline_s": 3, "retry_passes": 1,
                     "retry_delay_s": 0.5, **(download or {})},
    }))
    return recipe, tmp_path / "runs" / name


@pytest.mark.slow
def test_every_fault_becomes_a_row_with_a_reason(tmp_path):
    faults = [line.split(",", 1) for line in FAULTS.read_text().splitlines()[1:]]
    rows = [(u, "a " + c) for u, c in faults] + [(u, f"a picture {i}") for i, u in enumerate(archive_images(6))]
    rows.append(("http://img.optout.example/a.jpg", "a picture opted out"))
    recipe, run_dir = make_run(tmp_path, "faults", rows, {
        "replay": [str(ARCHIVE)], "allow_loopback": True, "opt_out_domains": ["optout.example"]})
    wit("run", recipe)
    got = {r["url"]: r for r in pq.read_table(run_dir / "download/part-faults.csv.parquet").to_pylist()}
    expected = {
        "404.jpg": ("failed", "http_404"), "500.jpg": ("failed", "http_500"),
        "hang.jpg": ("failed", "timeout"), "trickle.jpg": ("failed", "truncated"),
        "truncated.jpg": ("failed", "truncated"), "html.jpg": ("failed", "decode_error"),
        "corrupt.jpg": ("failed", "decode_error"), "huge.png": ("failed", "too_many_pixels"),
        "noai.jpg": ("refused", "opt_out_header"), "3.jpg": ("success", None),
        "redirect-private.jpg": ("refused", "private_address"),
        "redirect-metadata.jpg": ("refused", "link_local_address"), "slow.jpg": ("success", None),
        "429.jpg": ("failed", "http_429"), "cam.jpg": ("refused", "private_address"),
        "iam.jpg": ("refused", "link_local_address"), "photo.jpg": ("refused", "https_not_replayed"),
        "a.jpg": ("refused", "opt_out_domain"), "owl.jpg": ("refused", "robots_txt"),
        "down.jpg": ("refused", "robots_txt"),
    }
    for url, row in got.items():
        name = url.rsplit("/", 1)[1]
        if name in expected:
            assert (row["status"], row["reason"]) == expected[name], url
    assert got["http://faults.wit.test/429.jpg"]["attempts"] == 2  # retried in a later pass
    assert got["http://faults.wit.test/404.jpg"]["attempts"] == 1  # not retryable
    # Successes: the redirect chain, the slow image, the planted copies, variants and Fashion-MNIST
    # images of faults.csv, and the six archive images.
    assert sum(r["status"] == "success" for r in got.values()) == 8 + 6
    # No undecodable image reaches the output; hashes and sizes are the stored bytes'.
    images = pq.read_table(run_dir / "download/images/part-faults.csv.parquet").to_pylist()
    by_uid = {r["uid"]: r for r in got.values()}
    assert len(images) == 14
    for img in images:
        with Image.open(io.BytesIO(img["image"])) as im:
            im.load()
            assert (im.width, im.height) == (by_uid[img["uid"]]["width"], by_uid[img["uid"]]["height"])
        assert by_uid[img["uid"]]["bytes"] == len(img["image"]) and img["sha256"] == by_uid[img["uid"]]["sha256"]
    # sha256 is of the bytes as served (img2dataset's), so two URLs of one file share it.
    with MiniWeb([ARCHIVE]) as web:
        served = hashlib.sha256(web.sample_image).hexdigest()
    assert got["http://faults.wit.test/redirect/3.jpg"]["sha256"] == served
    assert got["http://faults.wit.test/slow.jpg"]["sha256"] == served
    # The downloads view answers "why did it fail".
    out = wit("sql", run_dir, "SELECT reason, count(*) n FROM downloads WHERE status != 'success' "
              "GROUP BY 1 ORDER BY 1", "--csv").stdout
    assert "private_address,2" in out and "http_404,1" in out


@pytest.mark.slow
def test_robots_txt_is_honoured_unless_the_recipe_turns_it_off(tmp_path):
    """A path the site's robots.txt disallows, and a site whose robots.txt answers 503 (complete
    disallow, RFC 9309), are refused as robots_txt before any image request; the switch turns it off."""
    rows = [("http://faults.wit.test/robots-disallowed/owl.jpg", "a owl"),
            ("http://robots-down.wit.test/down.jpg", "a heron"), ("http://faults.wit.test/ok/fine.jpg", "a fox")]
    outcomes = {}
    for respect in (True, False):
        recipe, run_dir = make_run(tmp_path, f"robots-{respect}", rows, {
            "replay": [str(ARCHIVE)], "allow_loopback": True, "respect_robots_txt": respect})
        wit("run", recipe)
        table = pq.read_table(run_dir / f"download/part-robots-{respect}.csv.parquet").to_pylist()
        outcomes[respect] = {r["url"].rsplit("/", 1)[1]: (r["status"], r["reason"], r["error_message"]) for r in table}
    assert outcomes[True]["owl.jpg"] == ("refused", "robots_txt", "disallowed by robots.txt")
    assert outcomes[True]["down.jpg"] == ("refused", "robots_txt", "robots.txt answered HTTP 503: complete disallow")
    assert outcomes[True]["fine.jpg"][0] == "success"
    assert {name: o[0] for name, o in outcomes[False].items()} == dict.fromkeys(["owl.jpg", "down.jpg", "fine.jpg"], "success")
    # The fault host's answer is kept for the run's other partitions; the 503 is not.
    assert len(list((tmp_path / "runs" / "robots-True" / "download" / "_robots").glob("*/*.json"))) == 1


def test_robots_answers_are_kept_for_the_run_and_asked_again_after_a_day(tmp_path):
    """A second partition reads the kept answers instead of asking the site again; a server error is
    asked again; a kept answer older than a day (RFC 9309's limit) is fetched afresh."""
    from pipelines.download import robots
    from pipelines.download.egress import EgressProxy, Policy

    urls = ["http://faults.wit.test/robots-disallowed/owl.jpg", "http://faults.wit.test/ok/fox.jpg",
            "http://robots-down.wit.test/down.jpg"]
    cache = tmp_path / "robots"
    want = {0: "disallowed by robots.txt", 2: "robots.txt answered HTTP 503: complete disallow"}
    with MiniWeb([ARCHIVE]) as web, EgressProxy(Policy(allow_loopback=True, route=web.address)) as proxy:
        assert robots.disallowed(urls, proxy.url, "wit-test", 5, cache=str(cache)) == want
        asked = web.requests
        assert robots.disallowed(urls, proxy.url, "wit-test", 5, cache=str(cache)) == want
        assert web.requests == asked + 1  # only the site that failed
        (entry,) = cache.glob("*/*.json")
        kept = json.loads(entry.read_text())
        kept["fetched"] -= 24 * 3600 + 1
        entry.write_text(json.dumps(kept))
        assert robots.disallowed(urls, proxy.url, "wit-test", 5, cache=str(cache)) == want
        assert web.requests == asked + 3
        assert json.loads(entry.read_text())["fetched"] > kept["fetched"]


@pytest.mark.slow
def test_progress_moves_while_a_partition_downloads_and_img2dataset_log_is_kept(tmp_path):
    """Sixteen one-second images on two threads: without a terminal, the log gets a progress line
    every second (here) while the one partition runs, in samples, with the share ok."""
    rows = [(f"http://faults.wit.test/slow/{i}.jpg", f"a fox {i}") for i in range(16)]
    recipe, run_dir = make_run(tmp_path, "slow", rows, {"replay": [str(ARCHIVE)], "allow_loopback": True,
                                                        "thread_count": 2, "respect_robots_txt": False})
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "WIT_PROGRESS_SECONDS": "1"}
    proc = subprocess.run([sys.executable, "-m", "wit_builder.cli", "run", str(recipe)], cwd=REPO,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = re.findall(r"download: ([\d,]+) of 16 samples \(\d+%\), [\d.]+/s; (\d+)% ok", proc.stderr)
    done = [int(d.replace(",", "")) for d, _ in lines]
    assert len(lines) >= 3 and any(0 < d < 16 for d in done), proc.stderr[-3000:]
    assert done == sorted(done) and all(ok == "100" for _, ok in lines if _ != "0")
    log = (run_dir / "download/logs/part-slow.csv.log").read_text()
    assert log.startswith("--- pass-1") and len(log) > 20
    assert not list((run_dir / "_state/download").glob("*.progress"))


@pytest.mark.slow
def test_loopback_is_refused_under_the_default_policy(tmp_path):
    with MiniWeb([ARCHIVE]) as web:
        url = f"http://127.0.0.1:{web.address[1]}/ok/x.jpg"
        recipe, run_dir = make_run(tmp_path, "strict", [(url, "a picture")])
        proc = wit("run", recipe, check=False)
        assert proc.returncode == 2 and "all 1 downloads failed or were refused: loopback_address" in proc.stderr
        assert web.requests == 0  # nothing reached the server
    row = pq.read_table(run_dir / "download/part-strict.csv.parquet").to_pylist()[0]
    assert (row["status"], row["reason"]) == ("refused", "loopback_address")


@pytest.mark.slow
def test_sigkill_mid_download_then_rerun_gives_identical_outputs(tmp_path):
    urls = archive_images(40)
    rows = [(u, f"a picture {i}") for i, u in enumerate(urls)]
    settings = {"replay": [str(ARCHIVE)], "allow_loopback": True, "samples_per_shard": 5,
                "thread_count": 2}
    clean, clean_dir = make_run(tmp_path, "clean", rows, settings)
    wit("run", clean)

    killed, killed_dir = make_run(tmp_path, "killed", rows, settings)
    proc = subprocess.Popen([sys.executable, "-m", "wit_builder.cli", "run", str(killed)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    work = killed_dir / "download" / "_work"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(work.rglob("*_stats.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and img2dataset's workers, like a crash
    proc.wait()
    finished_shards = len(list(work.rglob("*_stats.json")))
    assert 2 <= finished_shards < 8 and not (killed_dir / "download" / "part-killed.csv.parquet").exists()

    wit("run", killed)
    for sub in ("download/part-killed.csv.parquet", "download/images/part-killed.csv.parquet"):
        a = pq.read_table(clean_dir / sub.replace("killed", "clean"))
        b = pq.read_table(killed_dir / sub)
        assert a.num_rows > 20 and a.equals(b), sub
    assert not work.exists()  # the work folder is gone once the partition is complete
    marker = json.loads((killed_dir / "_state/download/killed.csv.json").read_text())
    assert marker["resumed_shards"] == finished_shards  # what was finished was not fetched again


def process_table() -> dict[int, tuple[int, int, str, str]]:
    """Every process now, from /proc: pid -> (parent, nice, start time, state)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        table[int(stat.parent.name)] = (int(fields[1]), int(fields[16]), fields[19], fields[0])
    return table


def descendants(root: int) -> dict[int, tuple[int, str]]:
    """The processes below `root`: pid -> (nice, start time), the start time telling a reused pid apart."""
    table, found, todo = process_table(), {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, nice, start, _) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = (nice, start)
                todo.append(pid)
    return found


def still_alive(processes: dict[int, tuple[int, str]]) -> list[int]:
    table = process_table()
    return [pid for pid, (_, start) in processes.items()
            if pid in table and table[pid][2] == start and table[pid][3] != "Z"]  # a zombie has ended


@pytest.mark.slow
def test_no_phash_process_of_a_download_outlives_it_when_it_is_killed(tmp_path):
    """SIGKILL to the process running a download task (here the `wit run` itself, one worker): its
    pHash processes (the ones at nice 10) end within seconds, rather than wait for ever on pipes that
    they hold open for one another. (img2dataset's own pool worker is not covered yet.)"""
    rows = [(f"http://faults.wit.test/slow/{i}.jpg", f"a fox {i}") for i in range(40)]
    recipe, run_dir = make_run(tmp_path, "orphans", rows, {"replay": [str(ARCHIVE)], "allow_loopback": True,
                                                           "thread_count": 2, "samples_per_shard": 2,
                                                           "respect_robots_txt": False})
    proc = subprocess.Popen([sys.executable, "-m", "wit_builder.cli", "run", str(recipe)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    work = run_dir / "download" / "_work"
    below: dict[int, tuple[int, str]] = {}
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            below = {**below, **descendants(proc.pid)}
            # Mid-download: both pHash processes up, img2dataset's worker a shard in.
            if sum(nice == 10 for nice, _ in below.values()) >= 2 and any(work.rglob("*_stats.json")):
                break
            time.sleep(0.1)
        assert sum(nice == 10 for nice, _ in below.values()) >= 2 and len(below) >= 3, below
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and still_alive(below):
            time.sleep(0.1)
        hashers = {pid: v for pid, v in below.items() if v[0] == 10}
        survivors = {pid: hashers[pid] for pid in still_alive(hashers)}
        assert not survivors, f"pHash processes outlived the killed run (pid: (nice, start)): {survivors}"
    finally:
        for pid in still_alive(below):  # what the old code left behind: ours, so ended here
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
