"""Stage `download`: fetch every source into data/raw/: pinned ones verified (mirror first, then network), tracked ones again."""
from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

from tqdm import tqdm

from gpt.files import atomic_dir, atomic_write_json, sha256_file
from gpt.tokenizer import BPE_FILES
from pipeline.core.catalog import STAGES, command_line
from pipeline.core.layout import BPE_DIR, RAW, TRACKED
from pipeline.core.params import (DOWNLOAD_SOURCES, FILENAME, SHA256, Bool, Float, Int, List, Named, ParamsError,
                                  Section, Str, load_params)
from pipeline.data.fetch import (FetchError, MissingError, NetworkError, Source, env_offline, fetch_tracked,
                                 fetch_with_origin, resolve_mirror)

MANIFEST = STAGES["download"].report
HF_FILES = ("config.json", "model.safetensors")
# Where the GPT-2 BPE files are published (their sha256 is gpt.tokenizer's, which checks them on load).
BPE_URLS = {
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "https://openaipublic.blob.core.windows.net/gpt-2/models/124M/encoder.json",
                     "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2/124M/encoder.json"),
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "https://openaipublic.blob.core.windows.net/gpt-2/models/124M/vocab.bpe",
                  "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2/124M/vocab.bpe"),
}
BPE_SOURCES = tuple(Source(name=f"gpt2-{Path(name).stem}", urls=BPE_URLS[name], sha256=sha256, filename=name,
                           mirror_path=f"{BPE_DIR.name}/{name}") for name, sha256 in BPE_FILES.items())

PARAMS = {
    "download": Section(
        mirror=Str(optional=True),
        offline=Bool(),
        retries=Int(1, 10),
        backoff_s=Float(0, 60),
        timeout_s=Float(0, 3600, bounds="(]"),
        max_member_bytes=Int(low=1),
        sources=DOWNLOAD_SOURCES,
        hf_weights=Section(
            models=List(FILENAME),
            allow_unpinned=Bool(),
            pins=Named(Section(
                repo=Str(pattern=r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+"),
                revision=Str(pattern=r"[0-9a-f]{40}", optional=True),
                sha256=Named(dataclasses.replace(SHA256, optional=True)),
            )),
        ),
    )
}


def planned_sources(params: dict, origin: str = "params.yaml") -> list[tuple[str, Source]]:
    """(subfolder of data/raw, Source) for every file the stage must fetch."""
    for name, spec in params["sources"].items():
        if bool(spec["sha256"]) == spec["track"]:
            raise ParamsError(f"{origin}: download.sources.{name} needs either a sha256 (pinned) or "
                              "track: true (fetched again on every run), not both")
    plan = [("", Source(name=name, **spec)) for name, spec in params["sources"].items()]
    plan += [(BPE_DIR.name, source) for source in BPE_SOURCES]
    plan += _weight_sources(params["hf_weights"], origin)
    seen: set[str] = set()
    for folder, source in plan:
        target = f"{folder}/{source.filename}".lstrip("/")
        if target in seen:
            raise ParamsError(f"{origin}: two sources write data/raw/{target}")
        seen.add(target)
    return plan


def _weight_sources(cfg: dict, origin: str) -> list[tuple[str, Source]]:
    plan = []
    for model in cfg["models"]:
        pin = cfg["pins"].get(model)
        key = f"download.hf_weights.pins.{model}"
        if pin is None:
            raise ParamsError(f"{origin}: download.hf_weights.models lists {model} but {key} is missing")
        for name in HF_FILES:
            sha256 = pin["sha256"].get(name)
            unpinned = "revision" if pin["revision"] is None else f"sha256.{name}" if sha256 is None else ""
            if unpinned and not cfg["allow_unpinned"]:
                raise ParamsError(f"{origin}: {key}.{unpinned} is not pinned; pin it or set "
                                  "download.hf_weights.allow_unpinned: true to fetch unverified")
            url = f"https://huggingface.co/{pin['repo']}/resolve/{pin['revision'] or 'main'}/{name}"
            plan.append((f"hf/{model}", Source(name=f"{model}/{name}", urls=(url,), sha256=sha256 or "",
                                               filename=name, mirror_path=f"hf/{model}/{name}")))
    return plan


def fetch_all(plan: list[tuple[str, Source]], dest: Path, mirror: Path | None, offline: bool,
              params: dict) -> list[dict]:
    """Fetch the plan into dest; return manifest rows. Files unavailable offline or over a dead
    network are collected and reported together in one FetchError."""
    progress = partial(tqdm, disable=None, leave=False)  # no bars unless stderr is a terminal
    rows, missing = [], []
    network = {key: params[key] for key in ("max_member_bytes", "retries", "backoff_s", "timeout_s")}
    for folder, source in plan:
        try:
            if source.track:
                path, came_from = fetch_tracked(source, dest / folder, TRACKED / source.name, offline=offline,
                                                progress=progress, **network)
            else:
                path, came_from = fetch_with_origin(source, dest / folder, mirror=mirror, offline=offline,
                                                    progress=progress, **network)
        except MissingError as exc:
            reason = f" (last error: {exc.reason})" if exc.reason else ""
            missing.append(f"{folder}/{exc.filename} <{exc.url}>{reason}".lstrip("/"))
            continue
        # A pinned file was just checked against its sha256; only a tracked one is hashed here.
        rows.append({"file": str(path.relative_to(dest)), "sha256": source.sha256 or sha256_file(path),
                     "bytes": path.stat().st_size, "origin": came_from, "verified": bool(source.sha256), "tracked": source.track})
        print(f"download: {rows[-1]['file']} <- {came_from}")
    if missing:
        why = "offline" if offline else "could not be downloaded"  # unreachable, or cut short: see last error
        error = FetchError if offline else NetworkError  # only the network may do better on another try
        raise error(f"{len(missing)} file(s) not in mirror {mirror or '(none)'} and {why}: " + "; ".join(missing))
    return rows


def main(params_path: Path) -> None:
    """Fetch all sources into data/raw/ and write the manifest data/reports/download.json."""
    params = load_params(params_path, PARAMS)["download"]
    plan = planned_sources(params, params_path.name)
    mirror = resolve_mirror(params["mirror"])
    offline = params["offline"] or env_offline()
    TRACKED.mkdir(parents=True, exist_ok=True)  # a DVC output even when no source is tracked
    with atomic_dir(RAW) as staging:
        rows = fetch_all(plan, staging, mirror, offline, params)
    atomic_write_json(MANIFEST, {"mirror_used": mirror is not None, "files": rows})


if __name__ == "__main__":
    command_line("download", main)
