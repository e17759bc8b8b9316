"""Object storage by URL (s3://, gs://, ... through fsspec): listing, identity, and errors that name
the URL.

S3 goes through s3fs: the one filesystem that every reader here can take as it is (fsspec for the
trainer and webdataset, pyarrow through its fsspec handler, DuckDB's `register_filesystem`, and
img2dataset, which writes through fsspec itself). Credentials, region and endpoint come from the
standard places botocore reads: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`,
`AWS_PROFILE` and `~/.aws/`, instance roles; `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) for an
S3-compatible store such as MinIO or Ceph.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from .errors import WitError

URL = re.compile(r"^[a-z][a-z0-9+.-]*://")
READ_BLOCK = 16 << 20  # bytes per ranged GET when reading an input object front to back
LOCAL_SCHEMES = ("file://", "pipe:", "http://", "https://")  # read as they are, not through a store


def is_object_url(path: str) -> bool:
    """Whether `path` names an object in a store (s3://, gs://, ...) rather than a local file."""
    return bool(URL.match(str(path))) and not str(path).startswith(LOCAL_SCHEMES)


def filesystem(url: str):
    """(fsspec filesystem, path within it) for an object-store URL."""
    import fsspec

    with errors_named(url):
        return fsspec.core.url_to_fs(url)


@contextlib.contextmanager
def errors_named(url: str):
    """Turn a store's failure into one WitError that names the URL and says what to check."""
    try:
        yield
    except WitError:
        raise
    except FileNotFoundError as e:
        raise WitError(f"not found: no such bucket or object ({e})", where=url) from None
    except PermissionError as e:
        raise WitError(f"access denied: check the credentials and the bucket's policy ({e})", where=url) from None
    except ImportError as e:
        raise WitError(f"no filesystem for this URL ({e})", where=url) from None
    except Exception as e:
        raise WitError(problem(e), where=url) from None


def problem(e: Exception) -> str:
    """What went wrong with a store, for the user: credentials, the endpoint, or as it was said."""
    names = {type(x).__name__ for x in _chain(e)}
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return ("no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE "
                f"({type(e).__name__}: {e})")
    if names & {"EndpointConnectionError", "ClientConnectorError", "ConnectionRefusedError",
                "ServerDisconnectedError", "ConnectTimeoutError", "ConnectTimeout"}:
        return f"cannot reach the store's endpoint (AWS_ENDPOINT_URL?): {type(e).__name__}: {e}"
    return f"{type(e).__name__}: {e}"


def _chain(e: BaseException | None):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def list_objects(url: str, suffix: str) -> list[str]:
    """The objects under a URL that end in `suffix`, as sorted URLs: a glob pattern, a prefix (a
    "folder"), or one object."""
    fs, path = filesystem(url)
    if any(c in path for c in "*?["):
        found = glob(url)
    else:
        with errors_named(url):
            if fs.isdir(path):
                found = as_urls(url, (p for p in fs.find(path) if p.endswith(suffix)))
            else:
                fs.info(path)  # FileNotFoundError names a missing bucket or object here, not later
                found = [url]
    if not found:
        raise WitError(f"no {suffix} objects here", where=url)
    return found


def glob(pattern: str) -> list[str]:
    """The objects matching a glob pattern now, as sorted URLs (none: an empty list)."""
    fs, path = filesystem(pattern)
    with errors_named(pattern):
        fs.invalidate_cache()  # s3fs keeps listings: another process may have written since
        return as_urls(pattern, fs.glob(path))


def as_urls(like: str, paths) -> list[str]:
    """Paths within a store, as sorted URLs with the scheme of `like`."""
    protocol = like.split("://", 1)[0]
    return sorted(f"{protocol}://{p}" for p in paths)


def identity(url: str) -> dict:
    """What an object contributes to a fingerprint: its ETag (a content hash on S3) and size, which
    a copy of the same object elsewhere, or the same object seen from another machine, shares."""
    fs, path = filesystem(url)
    with errors_named(url):
        info = fs.info(path)
    return {"url": url, "size": info.get("size"), "etag": str(info.get("ETag") or info.get("etag") or
                                                               info.get("md5Hash") or info.get("mtime"))}


def forget_clients() -> None:
    """Drop the filesystems fsspec keeps per protocol, so that the next one reads the environment
    (credentials, endpoint) afresh."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    with errors_named(url):
        fs.invalidate_cache(path)
        return fs.exists(path)


def sibling(path: str, name: str) -> str:
    """The file called `name` in the same folder (or prefix, in a store) as `path`."""
    if is_object_url(path):
        return path.rsplit("/", 1)[0] + "/" + name
    return str(Path(path).with_name(name))


def is_file(path: str) -> bool:
    """Whether a local path or an object URL names a file (an object)."""
    if not is_object_url(path):
        return Path(path).is_file()
    fs, key = filesystem(path)
    with errors_named(path):
        return fs.isfile(key)


def size(path: str) -> int:
    if not is_object_url(path):
        return Path(path).stat().st_size
    fs, key = filesystem(path)
    with errors_named(path):
        return int(fs.size(key))


def open_input(path: str):
    """A local file or an object, opened for reading bytes (seekable; an object is read in large
    ranged requests, ahead of the reader)."""
    if not is_object_url(path):
        return open(path, "rb")
    fs, key = filesystem(path)
    with errors_named(path):
        return fs.open(key, "rb", block_size=READ_BLOCK, cache_type="readahead")


def files_under(path: str) -> list[str]:
    """A file, or every file under a folder (a prefix in a store), sorted; a local path or a URL."""
    if not is_object_url(path):
        p = Path(path)
        return sorted(str(f) for f in p.rglob("*") if f.is_file()) if p.is_dir() else [str(p)]
    fs, key = filesystem(path)
    with errors_named(path):
        fs.invalidate_cache()
        return as_urls(path, fs.find(key)) if fs.isdir(key) else [path]


def read_file(path: str) -> bytes:
    """A whole local file or object."""
    return read_bytes(path) if is_object_url(path) else Path(path).read_bytes()


def read_bytes(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """An object's bytes (or bytes [start, end), one ranged GET). A missing object raises
    FileNotFoundError, for the caller to say what its absence means."""
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path, start, end)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise WitError(problem(e), where=url) from None


def read_many(urls: list[str]) -> dict[str, bytes]:
    """The objects among `urls` that exist, by URL, fetched together (small ones: markers)."""
    if not urls:
        return {}
    fs, _ = filesystem(urls[0])
    keys = {filesystem(u)[1]: u for u in urls}
    with errors_named(urls[0]):
        return {keys[k]: data for k, data in fs.cat(list(keys), on_error="omit").items() if k in keys}


def read_ranges(url: str, spans: list[tuple[int, int]]) -> list[bytes]:
    """The bytes of each (offset, length) span of an object: ranged GETs, issued together (an empty
    span asks for nothing: S3 refuses an empty range)."""
    fs, path = filesystem(url)
    asked = [(o, n) for o, n in spans if n > 0]
    with errors_named(url):
        got = iter(fs.cat_ranges([path] * len(asked), [o for o, _ in asked], [o + n for o, n in asked],
                                 on_error="raise") if asked else [])
    return [next(got) if n > 0 else b"" for _, n in spans]


def upload(local: str | os.PathLike, url: str) -> None:
    """Put a local file at `url` (a multipart upload for a large one): the object appears whole when
    the put completes, or not at all."""
    fs, path = filesystem(url)
    with errors_named(url):
        fs.put_file(str(local), path)


def remove(url: str, recursive: bool = False) -> None:
    """Delete an object (or every object under a prefix); a missing one is fine."""
    fs, path = filesystem(url)
    with errors_named(url), contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=recursive)


def arrow_filesystem(url: str):
    """(pyarrow filesystem, path within it) for an object URL: pyarrow's readers through fsspec."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(url)
    return PyFileSystem(FSSpecHandler(fs)), path


def register_with_duckdb(con, url: str) -> None:
    """Let DuckDB connection `con` read URLs like `url` through the same fsspec filesystem (no DuckDB
    extension to download)."""
    fs, _ = filesystem(url)
    if not con.filesystem_is_registered(fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]):
        con.register_filesystem(fs)


class LocalS3:
    """A real S3-compatible server on 127.0.0.1 in a process of its own (moto's standalone server,
    from the `test` extra): for the tests, the benchmarks and trying object storage without an
    account. As a context manager it points this process's environment (and so its children's) at
    the server with throwaway credentials, and puts the environment back afterwards."""

    def __init__(self):
        self.process = None
        self.saved: dict[str, str | None] = {}

    def __enter__(self) -> LocalS3:
        import socket
        import subprocess
        import sys
        import time
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise RuntimeError("the local S3 server did not start (is moto[server] installed?)") from None
                time.sleep(0.1)
        env = {"AWS_ACCESS_KEY_ID": "wit-local", "AWS_SECRET_ACCESS_KEY": "wit-local",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint}
        self.saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        forget_clients()
        return self

    def __exit__(self, *exc) -> None:
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        forget_clients()
        if self.process is not None:
            self.process.terminate()
            self.process.wait()

    def bucket(self, name: str) -> str:
        """A new, empty bucket; its URL."""
        fs, _ = filesystem(f"s3://{name}")
        fs.mkdir(name)
        return f"s3://{name}"
