"""The download stage on the real mirror, over loopback HTTP, and on corrupt or missing inputs."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import UNREACHABLE, FileServer, copy_mirror, leftovers, point_at, run_stage, set_param
from gpt.files import sha256_file
from pipeline.core.errors import TEMPORARY_FAILURE
from pipeline.stages.download import BPE_SOURCES

SOURCE_FILES = ["the-verdict.txt", "tinyshakespeare.txt", "SMSSpamCollection", "instruction-data.json"]
BPE_FILES = [f"gpt2_bpe/{s.filename}" for s in BPE_SOURCES]


def assert_failed_cleanly(project: Path, result, *fragments: str) -> None:
    """Exit 1, one stderr line `download: error: ...` naming every fragment, no outputs left."""
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("download: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert not (project / "data" / "raw").exists()
    assert not (project / "data" / "reports" / "download.json").exists()
    assert leftovers(project) == []


def test_downloads_everything_from_mirror(downloaded: Path, mirror: Path):
    raw = downloaded / "data" / "raw"
    manifest = json.loads((downloaded / "data" / "reports" / "download.json").read_text())
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


def test_http_download_with_zip_extraction(project: Path, mirror: Path, tmp_path: Path):
    partial = copy_mirror(mirror, tmp_path / "partial", without=("the-verdict.txt", "sms+spam+collection.zip"))
    files = {"/verdict": (mirror / "the-verdict.txt").read_bytes(),
             "/sms.zip": (mirror / "sms+spam+collection.zip").read_bytes()}
    with FileServer(files) as server:
        point_at(project, server, "the-verdict", "/verdict")
        point_at(project, server, "sms-spam", "/sms.zip")
        result = run_stage(project, "download", partial)
    assert result.returncode == 0, result.stderr
    rows = {r["file"]: r for r in json.loads((project / "data/reports/download.json").read_text())["files"]}
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


def _manifest(project: Path) -> dict:
    return {row["file"]: row for row in json.loads((project / "data/reports/download.json").read_text())["files"]}


def test_tracked_source_is_fetched_again_and_conditional(project: Path, mirror: Path):
    """A tracked URL: no sha256; every run asks again (If-None-Match), reuses the copy on 304, takes new bytes on 200."""
    set_param(project, "download.sources.extra", {"urls": ["http://127.0.0.1:9/x"], "track": True, "filename": "extra.txt"})
    rows_v1 = b"label,text\na,one\nb,two\n"
    with FileServer({"/extra.txt": rows_v1}, etags=True) as server:
        point_at(project, server, "extra", "/extra.txt")
        first = run_stage(project, "download", mirror)
        assert first.returncode == 0, first.stderr
        assert (project / "data/raw/extra.txt").read_bytes() == rows_v1
        row = _manifest(project)["extra.txt"]
        assert (row["tracked"], row["verified"], row["origin"]) == (True, False, f"{server.url}/extra.txt")

        again = run_stage(project, "download", mirror)  # as DVC does: the stage's outputs are rebuilt
        assert again.returncode == 0, again.stderr
        assert _manifest(project)["extra.txt"]["origin"] == f"not modified:{server.url}/extra.txt"
        assert (project / "data/raw/extra.txt").read_bytes() == rows_v1

        server.files["/extra.txt"] = rows_v1 + b"c,three\n"
        changed = run_stage(project, "download", mirror)
        assert changed.returncode == 0, changed.stderr
        assert (project / "data/raw/extra.txt").read_bytes().endswith(b"c,three\n")
        assert server.statuses == [("/extra.txt", 200), ("/extra.txt", 304), ("/extra.txt", 200)]
    # Offline, the last copy stands in; pinned files still come from the mirror.
    offline = run_stage(project, "download", mirror, LLM_PIPELINE_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert _manifest(project)["extra.txt"]["origin"] == "last copy (offline)"


def test_a_source_is_pinned_or_tracked(project: Path, mirror: Path):
    set_param(project, "download.sources.the-verdict.track", True)
    result = run_stage(project, "download", mirror)
    assert result.returncode == 1
    assert result.stderr == ("download: error: params.yaml: download.sources.the-verdict needs either a sha256 "
                             "(pinned) or track: true (fetched again on every run), not both\n")


def test_an_unreachable_source_fails_with_the_retry_status(project: Path, mirror: Path, tmp_path: Path):
    """A network failure exits with TEMPORARY_FAILURE (75), the one failure a flow retries; offline it is 1."""
    partial = copy_mirror(mirror, tmp_path / "partial", without=("the-verdict.txt",))
    set_param(project, "download.sources.the-verdict.urls", [UNREACHABLE])
    set_param(project, "download.retries", 1)
    result = run_stage(project, "download", partial)
    assert result.returncode == TEMPORARY_FAILURE, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("download: error: 1 file(s) not in mirror") and UNREACHABLE in lines[0]
    assert not (project / "data" / "raw").exists()
