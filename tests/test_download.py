"""hamur-fast download against a local HTTP server (127.0.0.1) serving a generated archive: the whole path,
a checksum mismatch, an interrupted transfer, leftovers of a killed download, a local archive (--from), the
check of a folder already in place, and servers that are slow, stall or never stop (each a clear error within
seconds). No internet is used."""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import threading
import time
import zipfile

import pytest

from hamur_fast.cli import main
from hamur_fast.data import download as dl
from hamur_fast.data import load_movielens

from data_files import write_ml1m


FILES = ("ratings.dat", "users.dat", "movies.dat")


def _archive(tmp_path) -> bytes:
    """A zip in the layout of the official ml-1m.zip: one ml-1m/ folder with the three .dat files."""
    source = write_ml1m(tmp_path / "source" / "ml-1m")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in FILES:
            archive.write(source / name, f"ml-1m/{name}")
    return buffer.getvalue()


@pytest.fixture
def server(tmp_path):
    """``(base_url, routes)``: GET /<name> answers routes[name] = (body, announced length or None); a callable
    body is called with the handler's output stream instead (a slow or endless server)."""
    routes = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body, length = routes.get(self.path.lstrip("/"), (None, None))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            if callable(body):
                if length is not None:
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                try:
                    body(self.wfile)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
                    pass
                return
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
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        sizes = {name: archive.getinfo(f"ml-1m/{name}").file_size for name in FILES}
    local = dataclasses.replace(official, url=f"{base}/ml-1m.zip", sha256=hashlib.sha256(body).hexdigest(),
                                size=len(body), files=sizes)
    monkeypatch.setitem(dl.DATASETS, "movielens-1m", local)
    return base, routes, body


def test_official_address_and_checksum_are_recorded():
    official = dl.DATASETS["movielens-1m"]
    assert official.url == "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
    assert len(official.sha256) == 64 and official.directory == "ml-1m" and official.size == 5_917_549
    assert official.files == {"ratings.dat": 24_594_131, "users.dat": 134_368, "movies.dat": 171_308}


def test_download_unpacks_where_the_configs_look(tmp_path, local_dataset, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["download", "movielens-1m", "--quiet"]) == 0  # default --to data: configs read data/ml-1m
    assert "ready in data/ml-1m" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["ml-1m"]  # no scratch left behind
    assert len(load_movielens(tmp_path / "data" / "ml-1m").train) == 400
    assert main(["download", "movielens-1m", "--to", str(tmp_path / "data")]) == 0  # already there: kept
    assert "checked: ratings.dat, users.dat, movies.dat at their expected sizes" in capsys.readouterr().out


def test_a_folder_in_place_is_verified_before_it_is_called_ready(tmp_path, local_dataset, capsys):
    target = dl.download("movielens-1m", tmp_path / "data", progress=False)
    with open(target / "ratings.dat", "ab") as ratings:
        ratings.write(b"1::1::5::978300760\n")  # a changed file
    assert main(["download", "movielens-1m", "--to", str(tmp_path / "data"), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "exists but is not a complete copy (ratings.dat has" in error and "remove it and download again" in error
    (target / "users.dat").unlink()
    with pytest.raises(dl.DownloadError, match="users.dat missing"):
        dl.download("movielens-1m", tmp_path / "data", progress=False)


def test_from_a_local_archive_is_checked_like_a_download(tmp_path, local_dataset, capsys):
    _, _, body = local_dataset
    archive = tmp_path / "ml-1m.zip"
    archive.write_bytes(body)
    assert main(["download", "movielens-1m", "--from", str(archive), "--to", str(tmp_path / "data"), "--quiet"]) == 0
    assert "ready in" in capsys.readouterr().out
    assert len(load_movielens(tmp_path / "data" / "ml-1m").train) == 400
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(body[:-1] + bytes([body[-1] ^ 1]))
    assert main(["download", "movielens-1m", "--from", str(damaged), "--to", str(tmp_path / "other"), "--quiet"]) == 2
    assert "checksum mismatch for" in capsys.readouterr().err and not (tmp_path / "other" / "ml-1m").exists()
    assert main(["download", "movielens-1m", "--from", str(tmp_path / "nope.zip"), "--to", str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err


def _trickle(seconds_per_byte: float, count: int):
    def send(out):
        for _ in range(count):  # bounded: the server thread ends by itself
            out.write(b"x")
            out.flush()
            time.sleep(seconds_per_byte)
    return send


def _endless(out):
    for _ in range(10_000):  # bounded (640 MB): far past the size cap
        out.write(bytes(1 << 16))


@pytest.mark.parametrize("route, length, options, message", [
    # a byte every 0.1 s: every read is quick, the whole never ends; the deadline stops it
    ("trickle", None, {"deadline": 2, "timeout": 5}, "passed its 2 s deadline"),
    # headers, then silence: one read waits past its timeout
    ("stall", 10_000, {"deadline": 60, "timeout": 1}, "failed after 0 bytes"),
    # no length announced, a body without end: refused past the archive's size + margin
    ("endless", None, {"deadline": 60, "timeout": 5}, "sent more than"),
    # a length announced far past the archive: refused before reading
    ("huge", 10 ** 12, {"deadline": 60, "timeout": 5}, "announces 1,000,000,000,000 bytes"),
])
def test_slow_stalled_and_endless_servers_end_with_a_clear_error(tmp_path, local_dataset, route, length, options,
                                                                   message):
    base, routes, _ = local_dataset
    bodies = {"trickle": _trickle(0.1, 600), "stall": lambda out: time.sleep(20), "endless": _endless,
              "huge": lambda out: None}
    routes[route] = (bodies[route], length)
    started = time.monotonic()
    with pytest.raises(dl.DownloadError, match=message):
        dl.download("movielens-1m", tmp_path / "data", progress=False, url=f"{base}/{route}", **options)
    assert time.monotonic() - started < 30
    assert list((tmp_path / "data").iterdir()) == []


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
