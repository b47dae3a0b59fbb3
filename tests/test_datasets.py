"""Dataset sources: download names and local files, folders and globs, and how dvc.yaml comes to track them."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO, set_param
from pipeline.core.errors import DataError
from pipeline.data import sources
from pipeline.orchestration import dvcyaml

DOWNLOADS = {"sms-spam": {"filename": "SMSSpamCollection"}}


def test_resolve_names_folders_and_globs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/raw").mkdir(parents=True)
    (tmp_path / "data/raw/SMSSpamCollection").write_text("ham\thi\n")
    for name in ("docs/b.txt", "docs/a.md", "docs/sub/c.txt", "docs/.hidden.txt", "docs/.git/x.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("text\n")
    assert sources.resolve("corpus", ["sms-spam"], DOWNLOADS) == [Path("data/raw/SMSSpamCollection")]
    # A folder: every file under it but hidden ones, sorted; a glob: what it matches, sorted.
    assert sources.resolve("corpus", ["docs"], DOWNLOADS) == [Path("docs/a.md"), Path("docs/b.txt"),
                                                               Path("docs/sub/c.txt")]
    assert sources.resolve("corpus", ["docs/**/*.txt"], DOWNLOADS) == [Path("docs/b.txt"), Path("docs/sub/c.txt")]
    # The same file named twice is read once.
    assert sources.resolve("corpus", ["docs/b.txt", "docs/*.txt"], DOWNLOADS) == [Path("docs/b.txt")]


@pytest.mark.parametrize(("entry", "message"), [
    ("nowhere/x.txt", "datasets.corpus.sources: 'nowhere/x.txt' is neither a name in download.sources nor an "
                      "existing file, folder or glob"),
    ("docs/*.csv", "datasets.corpus.sources: 'docs/*.csv' matches no file"),
    ("*.txt", "*.txt: a glob needs a fixed folder before its first wildcard, e.g. corpus/*.txt"),
    ("data/raw", "data/raw: data/ holds the pipeline's outputs; keep your own data in another folder"),
    ("empty", "datasets.corpus.sources: 'empty' is an empty folder"),
])
def test_bad_sources_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str, message: str):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/a.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "data/raw").mkdir(parents=True)
    with pytest.raises(DataError) as error:
        sources.resolve("corpus", [entry], DOWNLOADS)
    assert str(error.value) == message


@pytest.mark.parametrize("entry", ["my-data/corpus", "my-data/corpus/*.txt"])
def test_a_source_git_does_not_track_is_missing_from_an_experiments_copy_and_says_how_to_bring_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str):
    """`dvc exp run --queue` and `--temp` run the stages in a copy of the workspace under .dvc/tmp/exps holding
    what git tracks; DVC names the main workspace in $DVC_ROOT."""
    main, copy = tmp_path / "project", tmp_path / "project/.dvc/tmp/exps/tmp1a2b"
    (main / "my-data/corpus").mkdir(parents=True)
    (main / "my-data/corpus/notes.txt").write_text("text\n")
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(main))
    with pytest.raises(DataError) as error:
        sources.resolve("corpus", [entry], DOWNLOADS)
    assert str(error.value) == (f"datasets.corpus.sources: {entry!r} is not in this experiment's temporary "
                                "workspace (DVC copies there only the files git tracks): commit it, or queue with "
                                "`--copy-paths my-data/corpus`")
    monkeypatch.setenv("DVC_ROOT", str(copy))  # a source missing from the project itself is named as before
    with pytest.raises(DataError, match="is neither a name|matches no file"):
        sources.resolve("corpus", [entry], DOWNLOADS)


def test_dvc_yaml_tracks_local_sources_and_tracked_downloads(tmp_path: Path):
    """The generator writes each local source (a glob's fixed folder) into the deps of validate and tokenize,
    and marks download always_changed while a source is tracked; a stale dvc.yaml stops the stage."""
    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((REPO / name).read_text())
    set_param(tmp_path, "datasets.corpus.sources", ["tinyshakespeare", "notes", "/srv/text/*.md"])
    set_param(tmp_path, "datasets.classification.sources", ["labels/**/*.csv"])
    with pytest.raises(DataError, match="stage validate does not track the local source notes; run "
                                        "`llm-pipeline dvc-yaml`"):
        sources.require_tracked("validate", ["notes"], tmp_path / "dvc.yaml")
    assert dvcyaml.refresh(tmp_path / "dvc.yaml")
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    for stage in ("validate", "tokenize"):
        deps = stages[stage]["deps"]
        assert [d for d in deps if not d.startswith(("gpt/", "pipeline/", "data/"))] == ["notes", "/srv/text", "labels"]
        sources.require_tracked(stage, ["notes", "/srv/text", "labels"], tmp_path / "dvc.yaml")
    assert "notes" not in stages["pretrain"]["deps"]
    assert "always_changed" not in stages["download"]

    set_param(tmp_path, "download.sources.the-verdict.sha256", None)
    set_param(tmp_path, "download.sources.the-verdict.track", True)
    set_param(tmp_path, "datasets.corpus.sources", ["tinyshakespeare"])
    set_param(tmp_path, "datasets.classification.sources", ["sms-spam"])
    assert dvcyaml.refresh(tmp_path / "dvc.yaml")
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert stages["download"]["always_changed"] is True
    assert stages["validate"]["deps"] == yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["validate"]["deps"]
    assert not dvcyaml.refresh(tmp_path / "dvc.yaml")  # idempotent


def test_a_flow_override_of_sources_rewrites_dvc_yaml(tmp_path: Path):
    from pipeline.orchestration.flows import apply_params

    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((REPO / name).read_text())
    changed = apply_params(tmp_path, overrides={"datasets.corpus.sources": ["tinyshakespeare", "notes/*.md"]})
    assert changed == ["datasets.corpus.sources"]
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert "notes" in stages["validate"]["deps"] and "notes" in stages["tokenize"]["deps"]
