"""``padmmirnn data fetch`` against a local HTTP server on 127.0.0.1 (never any other
address): verified download, wrong checksum, interrupted transfer then resumed, no
network, and unpacking an aclImdb archive."""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from padmmirnn import fetch
from padmmirnn.cli import main
from padmmirnn.datafiles import read_info

PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
              "ALL_PROXY")


class Handler(BaseHTTPRequestHandler):
    """Serves ``server.files``; the first GET of a name in ``server.cut`` sends only
    half of the body and drops the connection. Supports ``Range: bytes=N-``."""

    timeout = 5

    def do_GET(self):  # noqa: N802 (http.server API)
        name = self.path.lstrip("/")
        body = self.server.files.get(name)
        self.server.log.append((name, self.headers.get("Range")))
        if body is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if name in self.server.cut:
            self.server.cut.discard(name)
            self.wfile.write(body[start: start + (len(body) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    """A loopback server in a thread; stops at teardown, or by itself after 60 s."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.files, httpd.cut, httpd.log = {}, set(), []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    watchdog = threading.Timer(60, httpd.shutdown)
    watchdog.start()
    yield httpd
    watchdog.cancel()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


BODY = bytes(range(256)) * 400


def test_download_verifies_checksum(server, tmp_path):
    server.files["a.bin"] = BODY
    line = fetch.download(server.url + "a.bin", tmp_path / "a.bin", sha(BODY))
    assert "downloaded, SHA-256 verified" in line
    assert (tmp_path / "a.bin").read_bytes() == BODY
    # a verified copy is not downloaded again
    assert "present" in fetch.download(server.url + "a.bin", tmp_path / "a.bin", sha(BODY))
    assert len(server.log) == 1


def test_wrong_checksum_leaves_nothing(server, tmp_path):
    server.files["a.bin"] = BODY
    with pytest.raises(fetch.FetchError, match="a.bin: SHA-256 mismatch"):
        fetch.download(server.url + "a.bin", tmp_path / "a.bin", sha(b"other"))
    assert list(tmp_path.iterdir()) == []


def test_interrupted_transfer_resumes(server, tmp_path):
    server.files["a.bin"] = BODY
    server.cut.add("a.bin")
    with pytest.raises(fetch.FetchError, match="transfer interrupted .* run the command again"):
        fetch.download(server.url + "a.bin", tmp_path / "a.bin", sha(BODY), attempts=1)
    part = tmp_path / "a.bin.part"
    assert part.stat().st_size == len(BODY) // 2 and not (tmp_path / "a.bin").exists()
    fetch.download(server.url + "a.bin", tmp_path / "a.bin", sha(BODY), attempts=1)
    assert (tmp_path / "a.bin").read_bytes() == BODY and not part.exists()
    assert server.log == [("a.bin", None), ("a.bin", f"bytes={len(BODY) // 2}-")]


def test_retry_resumes_within_one_call(server, tmp_path):
    server.files["a.bin"] = BODY
    server.cut.add("a.bin")
    fetch.download(server.url + "a.bin", tmp_path / "a.bin", sha(BODY))
    assert (tmp_path / "a.bin").read_bytes() == BODY
    assert [r for _, r in server.log] == [None, f"bytes={len(BODY) // 2}-"]


def test_no_network_is_one_clear_line(tmp_path, capsys, monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["data", "fetch", "mnist", "--to", str(tmp_path / "d"),
                 "--base-url", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "cannot connect" in err and "offline" in err and f"127.0.0.1:{port}" in err


def imdb_archive() -> bytes:
    """A tiny aclImdb_v1.tar.gz: two reviews per split and class."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for split in ("train", "test"):
            for label in ("pos", "neg"):
                for i in range(2):
                    data = f"{label} review number {i} of {split}".encode()
                    info = tarfile.TarInfo(f"aclImdb/{split}/{label}/{i}_8.txt")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_fetch_imdb_command_unpacks_and_prepares(server, tmp_path, monkeypatch, capsys):
    archive = imdb_archive()
    server.files["aclImdb_v1.tar.gz"] = archive
    source = fetch.SOURCES["imdb"]
    monkeypatch.setitem(fetch.SOURCES, "imdb", fetch.Source(
        source.base_url, {"aclImdb_v1.tar.gz": sha(archive)}, True, source.next_step))
    monkeypatch.setenv(fetch.ENV_BASE_URL, server.url)
    assert main(["data", "fetch", "imdb", "--to", str(tmp_path / "d")]) == 0
    assert "unpacked" in capsys.readouterr().out
    assert (tmp_path / "d" / "aclImdb" / "test" / "neg" / "1_8.txt").is_file()
    assert main(["data", "prepare", "imdb", "--source", str(tmp_path / "d" / "aclImdb"),
                 "--out", str(tmp_path / "i_train.h5")]) == 0
    assert read_info(str(tmp_path / "i_test.h5")).n == 4


def test_fetch_mnist_command_with_wrong_checksum(server, tmp_path, capsys):
    for name in fetch.SOURCES["mnist"].files:
        server.files[name] = b"not the published file"
    code = main(["data", "fetch", "mnist", "--to", str(tmp_path / "d"), "--base-url",
                 server.url])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "SHA-256 mismatch" in err
    assert list((tmp_path / "d").iterdir()) == []
