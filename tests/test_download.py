"""Downloads against a local HTTP server: resume, size/sha256 checks, tarball extraction, offline errors."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path
from typing import ClassVar

import pytest

from anetrain.cli import main
from anetrain.data import download as D
from anetrain.errors import AnetrainError
from helpers.data import shared_file


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves files from ``root`` under their URL path, honouring ``Range: bytes=N-``; can cut a response."""

    root: Path
    cut_after: ClassVar[dict[str, int]] = {}  # path -> stop after this many bytes (simulated interruption)
    requests: ClassVar[list[tuple[str, str | None]]] = []

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        self.requests.append((path, self.headers.get("Range")))
        f = self.root / path.lstrip("/")
        if not f.is_file():
            self.send_error(404)
            return
        data = f.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].rstrip("-"))
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.cut_after.pop(path, None)
        self.wfile.write(body if cut is None else body[:cut])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = type("H", (RangeHandler,), {"root": root, "cut_after": {}, "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()


def serve(root: Path, asset: D.Asset, data: bytes) -> None:
    path = root / D.urllib.parse.urlsplit(asset.url).path.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_fetch_verifies_size_and_sha256_and_resumes(server, tmp_path):
    root, base, handler = server
    data = shared_file("tok512.bin").read_bytes()
    asset = D.mirrored(D.ASSETS["tok512"], base)
    serve(root, asset, data)
    path_in_url = D.urllib.parse.urlsplit(asset.url).path
    handler.cut_after[path_in_url] = 1000  # the first attempt stops after 1000 bytes
    out = tmp_path / "out"
    with pytest.raises(AnetrainError):
        D.fetch(asset, out)  # short read: size check fails, the .part file stays
    assert (out / "tok512.bin.part").stat().st_size == 1000
    path = D.fetch(asset, out)  # resumes with a Range request
    assert path.read_bytes() == data and not (out / "tok512.bin.part").exists()
    assert handler.requests[-1] == (path_in_url, "bytes=1000-")
    assert D.fetch(asset, out) == path  # already there: verified, not downloaded again
    assert len(handler.requests) == 2


def test_a_corrupt_download_is_refused(server, tmp_path):
    root, base, _ = server
    asset = D.mirrored(D.ASSETS["tok512"], base)
    serve(root, asset, b"x" * 6227)  # right size, wrong content
    with pytest.raises(AnetrainError, match="sha256"):
        D.fetch(asset, tmp_path / "out")
    assert not (tmp_path / "out" / "tok512.bin").exists()


def test_tinystories_shard_is_extracted_from_the_tarball(server, tmp_path):
    root, base, _ = server
    shard = bytes(D.TINYSTORIES_SHARD.size)  # a zero shard of the real size compresses to a few KB
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("tok32000/data00.bin")
        info.size = len(shard)
        tar.addfile(info, io.BytesIO(shard))
    serve(root, D.mirrored(D.TINYSTORIES_TARBALL, base), buf.getvalue())
    rc = main(["data", "tinystories", "--out", str(tmp_path / "d"), "--mirror", base, "--no-tokenizer"])
    assert rc == 0
    out = tmp_path / "d" / "tinystories_data00.bin"
    assert out.stat().st_size == D.TINYSTORIES_SHARD.size
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(shard).digest()
    assert not (tmp_path / "d" / "TinyStories_tok32000.tar.gz").exists()  # deleted after extraction


def test_cli_fetches_models_and_tokenizers(server, tmp_path):
    root, base, _ = server
    for key, name in [
        ("stories260K", "stories260K.bin"),
        ("tok512", "tok512.bin"),
        ("tokenizer", "tokenizer.bin"),
    ]:
        serve(root, D.mirrored(D.ASSETS[key], base), shared_file(name).read_bytes())
    rc = main(
        [
            "data",
            "tinystories",
            "--out",
            str(tmp_path / "m"),
            "--mirror",
            base,
            "--no-data",
            "--model",
            "stories260K",
        ]
    )
    assert rc == 0
    for name in ("stories260K.bin", "tok512.bin", "tokenizer.bin"):
        assert (tmp_path / "m" / name).read_bytes() == shared_file(name).read_bytes()


def test_offline_is_a_clear_one_line_error(tmp_path, capsys):
    rc = main(
        ["data", "tinystories", "--out", str(tmp_path / "o"), "--no-data", "--mirror", "http://127.0.0.1:9"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "offline" in err[0] and "Traceback" not in err[0]


def test_not_gzip_is_refused(server, tmp_path):
    root, base, _ = server
    serve(root, D.mirrored(D.TINYSTORIES_TARBALL, base), gzip.compress(b"not a tar"))
    with pytest.raises(AnetrainError, match="not a readable"):
        D.fetch_tinystories(tmp_path / "t", tarball=D.mirrored(D.TINYSTORIES_TARBALL, base))
