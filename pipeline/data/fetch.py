"""Fetch files by URL or from a local mirror folder, verified by sha256 and written atomically (the download stage's engine)."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from email.message import Message
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping, Sequence

from gpt.files import atomic_file, atomic_write_json, sha256_file, temp_beside
from pipeline.core.errors import TEMPORARY_FAILURE

MIRROR_ENV = "LLM_PIPELINE_MIRROR"  # a folder holding copies of the files (see resolve_mirror)
OFFLINE_ENV = "LLM_PIPELINE_OFFLINE"  # 1: never touch the network
# Far above any member we fetch, yet it stops a zip bomb from filling the disk.
DEFAULT_MAX_MEMBER_BYTES = 1 << 30


class FetchError(OSError):
    """A file could not be obtained or did not match its checksum (an I/O failure, reported in one line)."""


class NetworkError(FetchError):
    """Files could not be downloaded, though the network was allowed: a stage that meets it exits with
    TEMPORARY_FAILURE, so that a flow tries again later."""

    exit_status = TEMPORARY_FAILURE


class BadContentError(FetchError):
    """Bytes were obtained but are wrong (checksum, archive); retrying the same URL won't help."""


class MissingError(FetchError):
    """A file is in no mirror and could not be downloaded (offline or network failure)."""

    def __init__(self, message: str, filename: str, url: str, reason: str = ""):
        super().__init__(message)
        self.filename = filename
        self.url = url
        self.reason = reason  # the last network error, if any


@dataclass(frozen=True)
class Source:
    """One remote file: where it lives, what it must hash to, and its local name.

    With `archive_member` set, the URLs and the mirror hold a zip archive and `filename`
    is that member extracted; `sha256` is then the member's hash, not the zip's, since the
    same member can be served in zips that differ byte for byte. An empty `sha256` means
    unpinned: accepted unverified (callers must opt in to that explicitly, or set `track`:
    fetched again on every run, see fetch_tracked).
    """

    name: str
    urls: Sequence[str]
    sha256: str
    filename: str
    # Where the verified file is looked up in a mirror folder (defaults to filename).
    mirror_path: str = ""
    archive_member: str = ""
    track: bool = False

    @property
    def mirror_relpath(self) -> str:
        return self.mirror_path or self.filename


def _check_sha256(path: Path, sha256: str, label: str) -> None:
    if not sha256:
        return
    actual = sha256_file(path)
    if actual != sha256:
        raise BadContentError(f"{label}: sha256 mismatch (expected {sha256}, got {actual})")


def extract_member(
    archive: Path, member: str, dest: Path, sha256: str, max_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> None:
    """Extract only `member` of the zip `archive` to dest, atomically, verified by sha256.

    The whole archive is refused if any member name is absolute or climbs out with `..`,
    and the member is refused once it inflates past `max_bytes` (its header may lie).
    """
    label = f"{archive.name}:{member}"
    try:
        with zipfile.ZipFile(archive) as bundle:
            for info in bundle.infolist():
                path = PurePosixPath(info.filename.replace("\\", "/"))
                if path.is_absolute() or ".." in path.parts or ":" in info.filename:
                    raise BadContentError(f"{archive.name}: unsafe member path {info.filename!r}")
            try:
                info = bundle.getinfo(member)
            except KeyError:
                raise BadContentError(f"{archive.name}: no member {member!r}") from None
            if info.file_size > max_bytes:
                raise BadContentError(f"{label}: member is {info.file_size} bytes, over the {max_bytes}-byte limit")
            with atomic_file(dest) as tmp:
                with bundle.open(info) as src, open(tmp, "wb") as out:
                    while block := src.read(1 << 16):
                        if out.tell() + len(block) > max_bytes:
                            raise BadContentError(f"{label}: member inflates past the {max_bytes}-byte limit")
                        out.write(block)
                _check_sha256(tmp, sha256, label)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise BadContentError(f"{archive.name}: not a readable zip archive ({exc})") from exc


def _install(
    src: Path, dest: Path, sha256: str, member: str, max_bytes: int, label: str, move: bool
) -> None:
    """Put the verified file from src (or its zip member) at dest atomically."""
    if member:
        extract_member(src, member, dest, sha256, max_bytes)
        return
    _check_sha256(src, sha256, label)
    if move:
        os.replace(src, dest)
        return
    with atomic_file(dest) as tmp:
        shutil.copyfile(src, tmp)


def _download_once(url: str, tmp: Path, timeout: float, progress: Callable | None, label: str,
                   headers: Mapping[str, str] | None = None) -> Message:
    """Fetch url into tmp (its progress bar named `label`); return the response headers. Errors do not
    repeat the URL (the caller prefixes it); a 304 answer to conditional `headers` is an HTTPError."""
    request = urllib.request.Request(url, headers={"User-Agent": "llm-pipeline", **(headers or {})})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        bar = progress(total=total or None, desc=label,
                       unit="B", unit_scale=True) if progress else None
        try:
            while block := response.read(1 << 16):
                out.write(block)
                if bar is not None:
                    bar.update(len(block))
        except http.client.IncompleteRead as exc:
            raise FetchError(f"truncated download ({out.tell() + len(exc.partial)} of {total} bytes)") from exc
        finally:
            if bar is not None:
                bar.close()
        if total and out.tell() != total:
            raise FetchError(f"truncated download ({out.tell()} of {total} bytes)")
        return response.headers


def download_verified(
    urls: Sequence[str],
    sha256: str,
    dest: Path,
    retries: int = 3,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    progress: Callable | None = None,
    member: str = "",
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> str:
    """Download the first URL that yields a file with the given sha256 into dest, atomically;
    return that URL.

    With `member`, each URL serves a zip whose `member` is extracted and verified instead.
    Each URL is tried up to `retries` times with exponential backoff; nothing is left at
    dest (or beside it) unless a verified file was obtained. Raises MissingError when every
    attempt failed to connect or transfer, BadContentError when some URL served wrong bytes.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    bad_content = False
    for url in urls:
        for attempt in range(retries):
            # Named apart from dest's own temps: installing a zip member clears those while the zip is read.
            tmp = temp_beside(dest.with_name(f"{dest.name}.download"))
            try:
                _download_once(url, tmp, timeout_s, progress, dest.name)
                _install(tmp, dest, sha256, member, max_member_bytes, url, move=True)
                return url
            except BadContentError as exc:
                # Wrong bytes will not fix themselves on retry: move to the next URL.
                errors.append(str(exc))
                bad_content = True
                break
            except (OSError, http.client.HTTPException) as exc:  # URLError and FetchError are OSErrors
                errors.append(f"{url}: {exc}")
                if attempt + 1 < retries:
                    time.sleep(backoff_s * 2**attempt)
            finally:
                tmp.unlink(missing_ok=True)
    message = f"{dest.name}: could not download from any URL; " + "; ".join(errors)
    if bad_content:
        raise BadContentError(message)
    raise MissingError(message, dest.name, urls[0] if urls else "(no URL)", errors[-1] if errors else "")


def fetch_with_origin(
    source: Source,
    dest_dir: str | os.PathLike,
    mirror: str | os.PathLike | None = None,
    offline: bool = False,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    **download_kwargs,
) -> tuple[Path, str]:
    """Make `dest_dir/source.filename` exist with the right sha256; return its path and where it came
    from: "present" (already there and verified), "mirror:<path>", or the URL (unless offline)."""
    dest = Path(dest_dir) / source.filename
    if dest.is_file() and source.sha256 and sha256_file(dest) == source.sha256:
        return dest, "present"
    if mirror:
        candidate = Path(mirror) / source.mirror_relpath
        if candidate.is_file():
            _install(candidate, dest, source.sha256, source.archive_member, max_member_bytes,
                     str(candidate), move=False)
            return dest, f"mirror:{source.mirror_relpath}"
    url = source.urls[0] if source.urls else "(no URL)"
    if offline:
        raise MissingError(
            f"{source.filename}: not in mirror {mirror or '(none)'} and offline; get it from {url}",
            source.filename,
            url,
        )
    used = download_verified(source.urls, source.sha256, dest, member=source.archive_member,
                             max_member_bytes=max_member_bytes, **download_kwargs)
    return dest, used


VALIDATORS = "validators.json"  # beside a tracked source's last copy: what the server said of it


def _last_copy(source: Source, state: Path) -> tuple[Path | None, dict]:
    """The last fetched copy of a tracked source and its validators, if both are there and agree."""
    copy = state / source.filename
    try:
        saved = json.loads((state / VALIDATORS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, {}
    if not copy.is_file() or not isinstance(saved, dict) or saved.get("sha256") != sha256_file(copy):
        return None, {}
    return copy, saved


def fetch_tracked(
    source: Source,
    dest_dir: str | os.PathLike,
    state: Path,
    offline: bool = False,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    retries: int = 3,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    progress: Callable | None = None,
) -> tuple[Path, str]:
    """Fetch a tracked (unpinned) source again into `dest_dir`; return its path and where it came from.

    The last copy and the server's validators (ETag, Last-Modified) are kept in `state`, so a
    server that supports conditional requests answers 304 and nothing is transferred: the origin is
    then "not modified:<url>". Whatever the server says, the content hash decides what changed
    downstream. Offline, the last copy is used ("last copy (offline)"); a network failure is an
    error, never a silently stale copy.
    """
    dest = Path(dest_dir) / source.filename
    state.mkdir(parents=True, exist_ok=True)
    copy, saved = _last_copy(source, state)
    if offline:
        if copy is None:
            raise MissingError(f"{source.filename}: tracked source never fetched, and offline", source.filename,
                               source.urls[0])
        _install(copy, dest, "", "", max_member_bytes, str(copy), move=False)
        return dest, "last copy (offline)"
    errors: list[str] = []
    for url in source.urls:
        conditional = {}
        if copy is not None and saved.get("url") == url:
            conditional = {key: saved[field] for key, field in (("If-None-Match", "etag"),
                                                                ("If-Modified-Since", "last_modified")) if saved.get(field)}
        for attempt in range(retries):
            tmp = temp_beside(state / f"{source.filename}.download")
            try:
                headers = _download_once(url, tmp, timeout_s, progress, source.filename, conditional)
                _install(tmp, state / source.filename, "", source.archive_member, max_member_bytes, url, move=True)
                atomic_write_json(state / VALIDATORS, {"url": url, "etag": headers.get("ETag"),
                                                       "last_modified": headers.get("Last-Modified"),
                                                       "sha256": sha256_file(state / source.filename)})
                _install(state / source.filename, dest, "", "", max_member_bytes, url, move=False)
                return dest, url
            except urllib.error.HTTPError as exc:
                if exc.code == 304 and copy is not None:
                    _install(copy, dest, "", "", max_member_bytes, url, move=False)
                    return dest, f"not modified:{url}"
                errors.append(f"{url}: {exc}")
                if attempt + 1 < retries:
                    time.sleep(backoff_s * 2**attempt)
            except BadContentError as exc:
                errors.append(str(exc))
                break
            except (OSError, http.client.HTTPException) as exc:
                errors.append(f"{url}: {exc}")
                if attempt + 1 < retries:
                    time.sleep(backoff_s * 2**attempt)
            finally:
                tmp.unlink(missing_ok=True)
    raise MissingError(f"{source.filename}: could not fetch the tracked source; " + "; ".join(errors),
                       source.filename, source.urls[0], errors[-1] if errors else "")


def resolve_mirror(param: str | None) -> Path | None:
    """The mirror folder: the `download.mirror` param, else $LLM_PIPELINE_MIRROR, else none."""
    chosen = param or os.environ.get(MIRROR_ENV) or None
    if chosen is None:
        return None
    mirror = Path(chosen).expanduser()
    if not mirror.is_dir():
        raise FetchError(f"mirror folder {mirror} does not exist")
    return mirror


def env_offline() -> bool:
    """Whether $LLM_PIPELINE_OFFLINE asks for no network access."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in {"1", "true", "yes"}
