"""``hamur-fast download``: a public data set's official archive, checked and unpacked where configs look.

The archive is streamed to a hidden temporary file next to the target (with a progress bar), its SHA-256 is
checked against the published value, and it is unpacked into a hidden directory that is renamed into place
in one step. An interrupted download or a checksum mismatch leaves nothing where the configs look, and the
leftovers of a killed download are removed by the next one.

Ali-CCP has no stable public address (Tianchi asks for a login; the released HAMUR examples link to personal
cloud drives), so it is not offered here: put its processed CSV files where ``configs/aliccp_*.yaml`` look.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
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
    directory: str  # the archive's top-level directory, and the name it gets under --to
    files: tuple  # what a complete copy holds


DATASETS = {
    # GroupLens publishes the MD5 c4d9eecfca2ab87c1945afe126590906 (ml-1m.zip.md5); the SHA-256 of that same
    # archive (5,917,549 bytes) is the value pinned by TensorFlow Models and Keras-RS for this URL.
    "movielens-1m": Dataset(url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
                            sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
                            directory="ml-1m", files=("ratings.dat", "users.dat", "movies.dat")),
}
CHUNK = 1 << 16


class DownloadError(DataError):
    """The archive could not be fetched, did not match its checksum, or could not be unpacked."""


def download(name: str, to="data", progress: bool = True, url: str | None = None, timeout: float = 60.0) -> Path:
    """Fetch data set ``name`` into ``to/<directory>`` (returned); a complete copy already there is kept.
    ``url``: another address of the same archive (a mirror); the checksum still applies."""
    if name not in DATASETS:
        raise DownloadError(f"unknown data set {name!r}; available: {sorted(DATASETS)}")
    dataset = DATASETS[name]
    parent = Path(to)
    target = parent / dataset.directory
    if target.exists():
        missing = [f for f in dataset.files if not (target / f).is_file()]
        if missing:
            raise DownloadError(f"{target} exists but lacks {missing}: remove it and download again")
        return target
    parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(parent, dataset.directory)
    prefix = f".{dataset.directory}.download-{os.getpid()}-"
    with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as scratch:
        archive = Path(scratch) / "archive.zip"
        digest = _fetch(url or dataset.url, archive, progress, timeout)
        if digest != dataset.sha256:
            raise DownloadError(f"checksum mismatch for {url or dataset.url}: SHA-256 {digest}, expected "
                                f"{dataset.sha256} (a changed or damaged archive); nothing was unpacked")
        unpacked = _unpack(archive, Path(scratch) / "unpacked", dataset)
        os.replace(unpacked, target)  # one step: the configs see all of it or nothing
    return target


def _fetch(url: str, destination: Path, progress: bool, timeout: float) -> str:
    """Stream ``url`` into ``destination``; returns the SHA-256. Any shortfall is a DownloadError."""
    digest, received = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(destination, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name, disable=not progress) as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as err:  # ValueError: a malformed URL
        reason = getattr(err, "reason", None) or err
        raise DownloadError(f"download of {url} failed after {received:,} bytes ({reason}); nothing was "
                            "unpacked: run the command again") from None
    except Exception as err:  # http.client.IncompleteRead and the like: the connection ended early
        raise DownloadError(f"download of {url} was interrupted after {received:,} bytes "
                            f"({type(err).__name__}); nothing was unpacked: run the command again") from None
    if total is not None and received != total:
        raise DownloadError(f"download of {url} was interrupted after {received:,} of {total:,} bytes; "
                            "nothing was unpacked: run the command again")
    return digest.hexdigest()


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
