"""``hamur-fast download``: a public data set's official archive, checked and unpacked where configs look.

The archive is streamed to a hidden temporary file next to the target (with a progress bar), its size and
SHA-256 are checked against the published values, and it is unpacked into a hidden directory that is renamed
into place in one step. An interrupted download or a checksum mismatch leaves nothing where the configs look,
and the leftovers of a killed download are removed by the next one. A server cannot hold the command: every
read has a timeout, the whole transfer a deadline, and a body longer than the archive (plus a margin) is
refused. ``--from PATH`` takes an archive already on disk (offline machines) through the same checks, and a
folder already in place is verified (expected files and sizes) before it is called ready.

Ali-CCP has no stable public address (Tianchi asks for a login; the released HAMUR examples link to personal
cloud drives), so it is not offered here: put its processed CSV files where ``configs/aliccp_*.yaml`` look.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .errors import DataError


@dataclass(frozen=True)
class Dataset:
    url: str
    sha256: str  # of the archive, as published / as the archive has been since it was released
    size: int  # bytes of the archive: a longer body is refused
    directory: str  # the archive's top-level directory, and the name it gets under --to
    files: dict  # what a complete copy holds: file name -> size in bytes


DATASETS = {
    # GroupLens publishes the MD5 c4d9eecfca2ab87c1945afe126590906 (ml-1m.zip.md5); the SHA-256 of that same
    # archive (5,917,549 bytes) is the value pinned by TensorFlow Models and Keras-RS for this URL.
    "movielens-1m": Dataset(url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
                            sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
                            size=5_917_549, directory="ml-1m",
                            files={"ratings.dat": 24_594_131, "users.dat": 134_368, "movies.dat": 171_308}),
}
CHUNK = 1 << 16
SIZE_MARGIN = 1 << 20  # bytes past the archive's size before a body is refused (a server that never stops)


class DownloadError(DataError):
    """The archive could not be fetched, did not match its checksum, or could not be unpacked."""


def download(name: str, to="data", progress: bool = True, url: str | None = None, timeout: float = 60.0,
             deadline: float = 1800.0, source=None) -> Path:
    """Fetch data set ``name`` into ``to/<directory>`` (returned); a complete copy already there is verified
    and kept. ``url``: another address of the same archive (a mirror); ``source``: the archive as a local file
    (no network); the size and checksum apply to both. ``timeout``: seconds any one read may wait;
    ``deadline``: seconds the whole transfer may take."""
    if name not in DATASETS:
        raise DownloadError(f"unknown data set {name!r}; available: {sorted(DATASETS)}")
    if url and source:
        raise DownloadError("give either --url or --from, not both")
    dataset = DATASETS[name]
    parent = Path(to)
    target = parent / dataset.directory
    if target.exists():
        verify(target, dataset)
        return target
    if source is not None and not Path(source).is_file():
        raise DownloadError(f"--from {source}: no such file (the {dataset.directory}.zip archive is expected)")
    parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(parent, dataset.directory)
    prefix = f".{dataset.directory}.download-{os.getpid()}-"
    where = str(source) if source is not None else url or dataset.url
    with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as scratch:
        archive = Path(scratch) / "archive.zip"
        digest = _fetch(where, source is not None, archive, dataset.size, progress, timeout, deadline)
        if digest != dataset.sha256:
            raise DownloadError(f"checksum mismatch for {where}: SHA-256 {digest}, expected "
                                f"{dataset.sha256} (a changed or damaged archive); nothing was unpacked")
        unpacked = _unpack(archive, Path(scratch) / "unpacked", dataset)
        os.replace(unpacked, target)  # one step: the configs see all of it or nothing
    return target


def verify(target: Path, dataset: Dataset) -> None:
    """A folder already in place holds every expected file at its expected size."""
    wrong = []
    for name, size in dataset.files.items():
        path = target / name
        if not path.is_file():
            wrong.append(f"{name} missing")
        elif path.stat().st_size != size:
            wrong.append(f"{name} has {path.stat().st_size:,} bytes, expected {size:,}")
    if wrong:
        raise DownloadError(f"{target} exists but is not a complete copy ({'; '.join(wrong)}): remove it and "
                            "download again")


def _fetch(where: str, local: bool, destination: Path, size: int, progress: bool, timeout: float,
           deadline: float) -> str:
    """Stream the archive at ``where`` (a URL, or a file when ``local``) into ``destination``; returns its
    SHA-256. A shortfall, a body past ``size`` + SIZE_MARGIN, a read waiting over ``timeout`` s or a transfer
    past ``deadline`` s is a DownloadError."""
    digest, received, limit = hashlib.sha256(), 0, size + SIZE_MARGIN
    ends = time.monotonic() + deadline
    try:
        with _open(where, local, timeout) as (response, total), open(destination, "wb") as out:
            if total is not None and total > limit:
                raise DownloadError(f"{where} announces {total:,} bytes, but the archive has {size:,}: refused "
                                    "(not the expected file)")
            read = getattr(response, "read1", response.read)  # read1: what arrived, so the deadline is checked
            with tqdm(total=total, unit="B", unit_scale=True, desc=Path(where).name, disable=not progress) as bar:
                while chunk := read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                    if received > limit:
                        raise DownloadError(f"{where} sent more than {limit:,} bytes, but the archive has "
                                            f"{size:,}: refused (not the expected file); nothing was unpacked")
                    if time.monotonic() > ends:
                        raise DownloadError(f"download of {where} passed its {deadline:g} s deadline after "
                                            f"{received:,} bytes (a slow server?); nothing was unpacked: run it "
                                            "again, or fetch the archive another way and use --from PATH")
    except DownloadError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as err:  # ValueError: a malformed URL; timeouts are OSError
        reason = getattr(err, "reason", None) or err
        raise DownloadError(f"download of {where} failed after {received:,} bytes ({reason or type(err).__name__}); "
                            "nothing was unpacked: run the command again") from None
    except Exception as err:  # http.client.IncompleteRead and the like: the connection ended early
        raise DownloadError(f"download of {where} was interrupted after {received:,} bytes "
                            f"({type(err).__name__}); nothing was unpacked: run the command again") from None
    if total is not None and received != total:
        raise DownloadError(f"download of {where} was interrupted after {received:,} of {total:,} bytes; "
                            "nothing was unpacked: run the command again")
    return digest.hexdigest()


@contextlib.contextmanager
def _open(where: str, local: bool, timeout: float):
    """``(readable, announced length or None)`` for a URL (each read waits ``timeout`` s at most) or a file."""
    if local:
        with open(where, "rb") as handle:
            yield handle, os.fstat(handle.fileno()).st_size
    else:
        with urllib.request.urlopen(where, timeout=timeout) as response:
            yield response, int(response.headers.get("Content-Length") or 0) or None


def _unpack(archive: Path, destination: Path, dataset: Dataset) -> Path:
    """Extract the archive's top-level directory (no member may leave it) and check it is complete."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            for member in zipped.namelist():
                parts = Path(member).parts
                if Path(member).is_absolute() or ".." in parts or not parts or parts[0] != dataset.directory:
                    raise DownloadError(f"the archive holds {member!r}, outside {dataset.directory}/: refused")
            zipped.extractall(destination)
    except zipfile.BadZipFile as err:
        raise DownloadError(f"the downloaded archive is not a readable zip file ({err})") from None
    unpacked = destination / dataset.directory
    missing = [f for f in dataset.files if not (unpacked / f).is_file()]
    if missing:
        raise DownloadError(f"the archive lacks {missing}")
    verify(unpacked, dataset)
    return unpacked


def _remove_leftovers(parent: Path, directory: str) -> None:
    """Scratch directories of downloads whose process is gone (killed mid-way)."""
    prefix = f".{directory}.download-"
    for leftover in parent.glob(f"{prefix}*-*"):
        pid = leftover.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a temporary file of a dead one is a leftover)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
