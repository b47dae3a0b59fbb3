"""The download stage on the real mirror, over loopback HTTP, and on corrupt or missing inputs."""
from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from conftest import leftovers, run_stage, set_param
from gpt.fetch import sha256_file
from gpt.tokenizer import BPE_SOURCES

SOURCE_FILES = ["the-verdict.txt", "tinyshakespeare.txt", "SMSSpamCollection", "instruction-data.json"]
BPE_FILES = [f"gpt2_bpe/{s.filename}" for s in BPE_SOURCES]


def copy_mirror(mirror: Path, dest: Path, without: tuple[str, ...] = ()) -> Path:
    """A writable copy of the mirror, minus some files."""
    shutil.copytree(mirror, dest, ignore=shutil.ignore_patterns("SOURCES.md"))
    for name in without:
        (dest / name).unlink()
    return dest


def assert_failed_cleanly(project: Path, result, *fragments: str) -> None:
    """Exit 1, one stderr line `download: error: ...` naming every fragment, no outputs left."""
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("download: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert not (project / "data" / "raw").exists()
    assert not (project / "data" / "metrics" / "download.json").exists()
    assert leftovers(project) == []


def test_downloads_everything_from_mirror(downloaded: Path, mirror: Path):
    raw = downloaded / "data" / "raw"
    manifest = json.loads((downloaded / "data" / "metrics" / "download.json").read_text())
    rows = {row["file"]: row for row in manifest["files"]}
    assert sorted(rows) == sorted(SOURCE_FILES + BPE_FILES)
    for name, row in rows.items():
        assert sha256_file(raw / name) == row["sha256"] and (raw / name).stat().st_size == row["bytes"]
        assert row["verified"]
    # The spam table is extracted from the zip and checked against the member's own hash.
    assert rows["SMSSpamCollection"]["origin"] == "mirror:sms+spam+collection.zip"
    assert (raw / "SMSSpamCollection").read_bytes() == (mirror / "SMSSpamCollection").read_bytes()
    assert leftovers(downloaded) == []


def test_oversized_zip_member_is_refused(project: Path, mirror: Path):
    set_param(project, "download.max_member_bytes", 1000)
    result = run_stage(project, "download", mirror)
    assert_failed_cleanly(project, result, "SMSSpamCollection", "1000-byte limit")


def test_offline_without_mirror_lists_every_missing_file(project: Path):
    set_param(project, "download.offline", True)
    result = run_stage(project, "download", None)
    assert_failed_cleanly(project, result, "6 file(s) not in mirror (none) and offline")
    message = result.stderr
    for name in SOURCE_FILES + BPE_FILES:
        assert name in message
    assert "<https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip>" in message
    assert "<https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe>" in message


class FileServer:
    """Loopback HTTP server: serves `files`; paths in `truncate` announce the full length but
    send half and hang up. Counts requests per path."""

    def __init__(self, files: dict[str, bytes], truncate: frozenset[str] = frozenset()):
        self.files, self.truncate, self.hits = files, truncate, {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2] if self.path in server.truncate else data)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def point_at(project: Path, server: FileServer, source: str, path: str) -> None:
    set_param(project, f"download.sources.{source}.urls", [f"{server.url}{path}"])
    set_param(project, "download.backoff_s", 0.01)
    set_param(project, "download.retries", 2)


def test_http_download_with_zip_extraction(project: Path, mirror: Path, tmp_path: Path):
    partial = copy_mirror(mirror, tmp_path / "partial", without=("the-verdict.txt", "sms+spam+collection.zip"))
    files = {"/verdict": (mirror / "the-verdict.txt").read_bytes(),
             "/sms.zip": (mirror / "sms+spam+collection.zip").read_bytes()}
    with FileServer(files) as server:
        point_at(project, server, "the-verdict", "/verdict")
        point_at(project, server, "sms-spam", "/sms.zip")
        result = run_stage(project, "download", partial)
    assert result.returncode == 0, result.stderr
    rows = {r["file"]: r for r in json.loads((project / "data/metrics/download.json").read_text())["files"]}
    assert rows["the-verdict.txt"]["origin"] == f"{server.url}/verdict"
    assert rows["SMSSpamCollection"]["origin"] == f"{server.url}/sms.zip"
    assert sha256_file(project / "data/raw/SMSSpamCollection") == sha256_file(mirror / "SMSSpamCollection")
    assert leftovers(project) == []


def test_wrong_bytes_over_http_are_refused(project: Path, mirror: Path, tmp_path: Path):
    partial = copy_mirror(mirror, tmp_path / "partial", without=("the-verdict.txt",))
    with FileServer({"/verdict": b"not the verdict"}) as server:
        point_at(project, server, "the-verdict", "/verdict")
        result = run_stage(project, "download", partial)
    assert_failed_cleanly(project, result, "the-verdict.txt", "sha256 mismatch")
    assert server.hits["/verdict"] == 1  # wrong content is not retried


def test_unpinned_weights_need_explicit_opt_in(project: Path, mirror: Path):
    set_param(project, "download.hf_weights.models", ["gpt2-medium"])
    result = run_stage(project, "download", mirror)
    assert_failed_cleanly(project, result, "download.hf_weights.pins.gpt2-medium.revision is not pinned",
                          "allow_unpinned")
