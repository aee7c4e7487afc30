"""Downloads of public datasets with SHA-256 verification and resume.

``padmmirnn data fetch NAME --to DIR`` downloads every file of ``NAME`` into ``DIR``.
A file is first written to ``FILE.part``; an interrupted transfer continues from
where it stopped (HTTP ``Range``), on a retry or on the next run. Only a file
whose SHA-256 matches the published one is renamed into place. The base URL can be
replaced (``--base-url`` or ``PADMMIRNN_DATA_URL``), e.g. by a local mirror.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from padmmirnn.errors import PadmmError

ENV_BASE_URL = "PADMMIRNN_DATA_URL"
CHUNK = 1 << 16


class FetchError(PadmmError):
    """A download that failed: no network, HTTP error, wrong checksum."""


@dataclass(frozen=True)
class Source:
    """A downloadable dataset: base URL, files with their published SHA-256, and
    what to do afterwards."""

    base_url: str
    files: dict[str, str]
    extract: bool
    next_step: str


SOURCES = {
    "mnist": Source(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        {"train-images-idx3-ubyte.gz":
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
         "train-labels-idx1-ubyte.gz":
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
         "t10k-images-idx3-ubyte.gz":
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
         "t10k-labels-idx1-ubyte.gz":
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"},
        extract=False, next_step="padmmirnn data prepare idx --source {dir} --out mnist_train.h5"),
    "fashion-mnist": Source(
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        {"train-images-idx3-ubyte.gz":
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
         "train-labels-idx1-ubyte.gz":
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
         "t10k-images-idx3-ubyte.gz":
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
         "t10k-labels-idx1-ubyte.gz":
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"},
        extract=False,
        next_step="padmmirnn data prepare idx --source {dir} --out fashion_train.h5"),
    "imdb": Source(
        "https://ai.stanford.edu/~amaas/data/sentiment/",
        {"aclImdb_v1.tar.gz": "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"},
        extract=True,
        next_step="padmmirnn data prepare imdb --source {dir}/aclImdb --out imdb_train.h5"),
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _transfer(url: str, part: Path, timeout: float) -> None:
    """Append the rest of ``url`` to ``part`` (asking for a byte range when ``part``
    already holds a prefix; a server that ignores it sends everything again)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: the .part is complete
            return
        raise
    with response:
        mode = "ab" if have and response.status == 206 else "wb"
        length = response.headers.get("Content-Length")
        received = 0
        with part.open(mode) as f:
            while block := response.read(CHUNK):
                f.write(block)
                received += len(block)
    if length is not None and received < int(length):
        raise ConnectionError(f"connection closed after {received} of {length} bytes")


def download(url: str, dest: Path, sha256: str, attempts: int = 3,
             timeout: float = 30.0) -> str:
    """Download ``url`` to ``dest`` unless a verified copy is there; returns what was
    done. Keeps ``dest.part`` after a failed transfer so the next call resumes."""
    if dest.exists() and sha256_of(dest) == sha256:
        return f"{dest}: present, SHA-256 verified"
    part = dest.with_name(dest.name + ".part")
    for attempt in range(1, attempts + 1):
        try:
            _transfer(url, part, timeout)
            break
        except urllib.error.HTTPError as exc:
            raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise FetchError(f"{url}: cannot connect ({_reason(exc.reason)}); is this machine "
                             f"offline? Copy the files into {dest.parent} by hand, or point "
                             f"--base-url / {ENV_BASE_URL} at a reachable mirror") from None
        except (HTTPException, OSError) as exc:
            if attempt == attempts:
                size = part.stat().st_size if part.exists() else 0
                raise FetchError(f"{url}: transfer interrupted ({_reason(exc)}) after {size} "
                                 f"bytes, kept in {part}; run the command again to resume"
                                 ) from None
    got = sha256_of(part)
    if got != sha256:
        part.unlink()
        raise FetchError(f"{dest}: SHA-256 mismatch (expected {sha256}, got {got}); the "
                         f"download is corrupt or the file changed upstream, removed it")
    os.replace(part, dest)
    return f"{dest}: downloaded, SHA-256 verified"


def _reason(exc: object) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def extract_tar(archive: Path, folder: Path) -> str:
    """Unpack ``archive`` into ``folder`` atomically: each top-level entry appears only
    once the whole archive has been read."""
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=folder))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        for entry in tmp.iterdir():
            target = folder / entry.name
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(entry, target)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise FetchError(f"{archive}: cannot unpack ({exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return f"{archive}: unpacked into {folder}"


def fetch(name: str, folder: str, base_url: str | None = None) -> list[str]:
    """Download (and unpack) dataset ``name`` into ``folder``; one line per step."""
    if name not in SOURCES:
        raise FetchError(f"unknown dataset {name!r}; known: {', '.join(SOURCES)}")
    source = SOURCES[name]
    to = Path(folder)
    to.mkdir(parents=True, exist_ok=True)
    base = base_url or os.environ.get(ENV_BASE_URL) or source.base_url
    base = base if base.endswith("/") else base + "/"
    lines = []
    for filename, sha256 in source.files.items():
        lines.append(download(base + filename, to / filename, sha256))
        if source.extract:
            lines.append(extract_tar(to / filename, to))
    lines.append("next: " + source.next_step.format(dir=to))
    return lines
