"""hamur-fast download against a local HTTP server (127.0.0.1) serving a generated archive: the whole path,
a checksum mismatch, an interrupted transfer, leftovers of a killed download. No internet is used."""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import threading
import zipfile

import pytest

from hamur_fast.cli import main
from hamur_fast.data import download as dl
from hamur_fast.data import load_movielens

from data_files import write_ml1m


def _archive(tmp_path) -> bytes:
    """A zip in the layout of the official ml-1m.zip: one ml-1m/ folder with the three .dat files."""
    source = write_ml1m(tmp_path / "source" / "ml-1m")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in ("ratings.dat", "users.dat", "movies.dat"):
            archive.write(source / name, f"ml-1m/{name}")
    return buffer.getvalue()


@pytest.fixture
def server(tmp_path):
    """``(base_url, routes)``: GET /<name> answers routes[name] = (body, announced length or None)."""
    routes = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body, length = routes.get(self.path.lstrip("/"), (None, None))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(length or len(body)))
            self.end_headers()
            self.wfile.write(body)  # with a longer announced length, the connection then just ends

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", routes
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def local_dataset(tmp_path, server, monkeypatch):
    """movielens-1m pointing at the local server, with the generated archive's checksum."""
    base, routes = server
    body = _archive(tmp_path)
    routes["ml-1m.zip"] = (body, None)
    official = dl.DATASETS["movielens-1m"]
    local = dataclasses.replace(official, url=f"{base}/ml-1m.zip", sha256=hashlib.sha256(body).hexdigest())
    monkeypatch.setitem(dl.DATASETS, "movielens-1m", local)
    return base, routes, body


def test_official_address_and_checksum_are_recorded():
    official = dl.DATASETS["movielens-1m"]
    assert official.url == "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
    assert len(official.sha256) == 64 and official.directory == "ml-1m"


def test_download_unpacks_where_the_configs_look(tmp_path, local_dataset, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["download", "movielens-1m", "--quiet"]) == 0  # default --to data: configs read data/ml-1m
    assert "ready in data/ml-1m" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ml-1m"]  # no scratch left behind
    assert len(load_movielens(tmp_path / "data" / "ml-1m").train) == 400
    assert main(["download", "movielens-1m", "--to", str(tmp_path / "data")]) == 0  # already there: kept


def test_checksum_mismatch_leaves_nothing(tmp_path, local_dataset, capsys):
    base, routes, body = local_dataset
    routes["changed.zip"] = (body[:100] + bytes([body[100] ^ 1]) + body[101:], None)  # one bit flipped
    assert main(["download", "movielens-1m", "--to", str(tmp_path / "data"), "--url", f"{base}/changed.zip",
                 "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert "checksum mismatch for" in error and "nothing was unpacked" in error and "\n" not in error
    assert list((tmp_path / "data").iterdir()) == []


def test_interrupted_download_leaves_nothing(tmp_path, local_dataset):
    base, routes, body = local_dataset
    routes["cut.zip"] = (body[: len(body) // 2], len(body))  # announces the whole, sends half, hangs up
    with pytest.raises(dl.DownloadError, match=f"interrupted after {len(body) // 2:,}"):
        dl.download("movielens-1m", tmp_path / "data", progress=False, url=f"{base}/cut.zip", timeout=10)
    with pytest.raises(dl.DownloadError, match="failed after 0 bytes"):
        dl.download("movielens-1m", tmp_path / "data", progress=False, url=f"{base}/missing.zip")
    assert list((tmp_path / "data").iterdir()) == []


def test_leftovers_of_a_killed_download_are_removed(tmp_path, local_dataset):
    leftover = tmp_path / "data" / ".ml-1m.download-999999999-abc"
    leftover.mkdir(parents=True)
    (leftover / "archive.zip").write_bytes(b"half")
    dl.download("movielens-1m", tmp_path / "data", progress=False)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ml-1m"]


def test_archives_reaching_outside_their_folder_are_refused(tmp_path, local_dataset, monkeypatch):
    base, routes, _ = local_dataset
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("ml-1m/../../escape.txt", "x")
    routes["evil.zip"] = (buffer.getvalue(), None)
    monkeypatch.setitem(dl.DATASETS, "movielens-1m", dataclasses.replace(
        dl.DATASETS["movielens-1m"], sha256=hashlib.sha256(buffer.getvalue()).hexdigest()))
    with pytest.raises(dl.DownloadError, match="outside ml-1m/: refused"):
        dl.download("movielens-1m", tmp_path / "data", progress=False, url=f"{base}/evil.zip")
    assert not (tmp_path / "escape.txt").exists() and list((tmp_path / "data").iterdir()) == []
