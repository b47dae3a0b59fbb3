"""params.yaml: loading checks each stage's declared sections and keys strictly; writing it keeps its comments."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN, REPO, run_stage, set_param
from pipeline.core.catalog import STAGES
from pipeline.core.params import ParamsError, load_params
from pipeline.core.presets import load_preset, overlay
from pipeline.stages import download, tokenize_data as tokenize, validate


@pytest.mark.parametrize("stage", STAGES)
def test_repo_params_are_valid_for_every_stage(stage: str):
    params = load_params(REPO / "params.yaml", STAGES[stage].load().PARAMS)
    assert stage in params


def test_repo_defaults_reproduce_the_book():
    params = load_params(REPO / "params.yaml", tokenize.PARAMS)
    assert params["tokenize"]["corpus"] == {"train_ratio": 0.9, "split": "cut"}
    assert params["tokenize"]["classification"] == {"balance": "undersample", "stratify": False, "duplicates": "keep",
                                                    "seed": 123, "train_frac": 0.7, "val_frac": 0.1}
    assert params["datasets"]["classification"]["quoting"] == "book"


def _load_with(project: Path, dotted: str, value, module=tokenize) -> dict:
    set_param(project, dotted, value)
    return load_params(project / "params.yaml", module.PARAMS)


@pytest.mark.parametrize(
    ("dotted", "value", "message"),
    [
        ("tokenize.corpus.train_ratio", 1.5, "params.yaml: tokenize.corpus.train_ratio must be in (0, 1), got 1.5"),
        ("tokenize.corpus.train_ratio", "0.9", "params.yaml: tokenize.corpus.train_ratio must be a number, got '0.9'"),
        ("tokenize.corpus.split", "random", "params.yaml: tokenize.corpus.split must be one of cut, document"),
        ("tokenize.classification.seed", True, "params.yaml: tokenize.classification.seed must be an integer, got True"),
        ("tokenize.classification.seed", -1, "params.yaml: tokenize.classification.seed must be >= 0, got -1"),
        ("tokenize.classification.balance", "oversample", "params.yaml: tokenize.classification.balance must be one "
                                                          "of none, undersample, class_weight, got 'oversample'"),
        ("datasets.corpus.sources", [], "params.yaml: datasets.corpus.sources must be a list of at least 1 item(s)"),
        ("datasets.corpus.sources", [" "], "params.yaml: datasets.corpus.sources[0] must be a string matching"),
        ("datasets.classification.labels", ["spam"], "params.yaml: datasets.classification.labels must be a list of "
                                                     "at least 2 item(s), got ['spam']"),
        ("tokenize.instructions.shuffle", "no", "params.yaml: tokenize.instructions.shuffle must be true or false"),
        ("tokenize.typo", 1, "params.yaml: unknown key tokenize.typo (allowed: corpus, classification, instructions)"),
        ("datasets.classification.quoting", "loose", "params.yaml: datasets.classification.quoting must be one of "
                                                     "book, none, got 'loose'"),
        ("pretrain.context_length", 0, "params.yaml: pretrain.context_length must be >= 1, got 0"),
    ],
)
def test_bad_values_name_the_key(project: Path, dotted: str, value, message: str):
    with pytest.raises(ParamsError) as info:
        _load_with(project, dotted, value)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("dotted", "value", "message"),
    [
        ("download.sources.the-verdict.sha256", "abc", "download.sources.the-verdict.sha256 must be a string matching"),
        ("download.sources.the-verdict.filename", "../x.txt", "the-verdict.filename must be a string matching"),
        ("download.sources.the-verdict.urls", ["ftp://x"], "download.sources.the-verdict.urls[0] must be a string"),
        ("download.retries", 0, "download.retries must be in [1, 10], got 0"),
        ("download.sources.the-verdict.size", 1, "unknown key download.sources.the-verdict.size"),
    ],
)
def test_download_section_is_strict(project: Path, dotted: str, value, message: str):
    with pytest.raises(ParamsError, match=re.escape(message)):
        _load_with(project, dotted, value, download)


def test_missing_key_and_missing_section(project: Path):
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    del params["tokenize"]["corpus"]["train_ratio"]
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r"^params.yaml: missing key tokenize.corpus.train_ratio$"):
        load_params(path, tokenize.PARAMS)
    del params["pretrain"]
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r"^params.yaml: missing key pretrain.context_length$"):
        load_params(path, validate.PARAMS)


def test_sections_without_a_spec_pass_through(project: Path):
    set_param(project, "pretrain.future_key", {"anything": [1, 2]})
    params = _load_with(project, "evaluate", {"not": "specified yet"}, download)
    assert set(params) == {"download"}


def test_unreadable_params_file(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("download: [unclosed\n")
    with pytest.raises(ParamsError, match=r"^params.yaml: not valid YAML"):
        load_params(tmp_path / "params.yaml", download.PARAMS)
    with pytest.raises(ParamsError, match=r"nope.yaml: params file not found"):
        load_params(tmp_path / "nope.yaml", download.PARAMS)


def test_split_fractions_must_leave_room(project: Path):
    set_param(project, "tokenize.classification.train_frac", 0.95)
    result = run_stage(project, "tokenize")
    assert result.stderr == ("tokenize: error: params.yaml: tokenize.classification.train_frac + "
                             "tokenize.classification.val_frac must be < 1 (the last split needs rows), got 1.05\n")


def _bad_values(config_class):
    """(field, a value its declaration refuses, the reason) for every bounded field of a config dataclass."""
    from dataclasses import fields

    for spec in fields(config_class):
        meta = spec.metadata
        if meta.get("choices"):
            yield spec.name, "bogus", "must be one of"
        elif meta.get("low") is not None:
            yield spec.name, meta["low"] - 1, "must be >" if meta.get("high") is None else "must be in"


@pytest.mark.parametrize(("section", "config_class"), [
    ("pretrain", "gpt.train:TrainConfig"), ("pretrain", "gpt.model:GPTConfig"),
    ("finetune_classifier", "gpt.finetune:FinetuneConfig"), ("finetune_instruct", "gpt.finetune:FinetuneConfig")])
def test_param_checks_come_from_the_config_dataclasses(project: Path, section: str, config_class: str):
    """One declaration: a value the dataclass refuses is refused by params.yaml's check with the same reason."""
    import importlib

    module, name = config_class.split(":")
    cls = getattr(importlib.import_module(module), name)
    specs = STAGES[section].load().PARAMS
    checked = 0
    for field_name, value, reason in _bad_values(cls):
        if field_name not in specs[section].fields:
            continue  # not a param of this stage (GPTConfig.vocab_size, FinetuneConfig.beta1, ...)
        with pytest.raises(ValueError, match=f"{field_name} {reason}"):
            cls(**{field_name: value})
        original = yaml.safe_load((project / "params.yaml").read_text())
        set_param(project, f"{section}.{field_name}", value)
        with pytest.raises(ParamsError, match=rf"^params.yaml: {section}.{field_name} {reason}"):
            load_params(project / "params.yaml", specs)
        (project / "params.yaml").write_text(yaml.safe_dump(original, sort_keys=False))
        checked += 1
    assert checked >= 5


def _layout(text: str) -> tuple[list[str], list[str]]:
    """The comments of a params text in order, and its keys in order with their indentation."""
    comments = [line[line.index("#"):] for line in text.splitlines() if "#" in line]
    keys = [m.group(0) for line in text.splitlines() if (m := re.match(r"\s*[\w.-]+(?=:)", line))]
    return comments, keys


def test_flow_overrides_keep_the_comments_and_change_only_their_lines(tmp_path: Path):
    from pipeline.orchestration.flows import apply_params

    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((REPO / name).read_text())
    before = (REPO / "params.yaml").read_text()
    overrides = {"pretrain.max_steps": 7, "pretrain.lr": 5e-05, "evaluate.prompts": ["Hi", "yes"],
                 "finetune_classifier.max_length": None, "pretrain.sample_prompt": "on"}
    changed = apply_params(tmp_path, overrides=overrides)
    assert sorted(changed) == sorted(set(overrides) - {"finetune_classifier.max_length"})  # that one was null already

    after = (tmp_path / "params.yaml").read_text()
    lines = [(old, new) for old, new in zip(before.splitlines(), after.splitlines()) if old != new]
    assert len(after.splitlines()) == len(before.splitlines()) and len(lines) == len(changed)
    for old, new in lines:  # each changed line keeps its key and its comment
        assert old.split(":")[0] == new.split(":")[0] and old.partition("#")[2] == new.partition("#")[2]
    params = yaml.safe_load(after)  # as the stages read it: numbers stay numbers, strings stay strings
    pretrain = params["pretrain"]
    assert (pretrain["max_steps"], pretrain["lr"], pretrain["sample_prompt"]) == (7, 5e-05, "on")
    assert params["evaluate"]["prompts"] == ["Hi", "yes"] and "prompts: [Hi, 'yes']" in after  # still a flow list


def test_preset_apply_keeps_the_comments_and_key_order(project: Path):
    before = (project / "params.yaml").read_text()
    done = subprocess.run([str(BIN / "llm-pipeline"), "preset", "apply", "book"], cwd=project, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    after = (project / "params.yaml").read_text()
    assert after != before and _layout(after) == _layout(before)
    expected = yaml.safe_load(before)
    overlay(expected, load_preset("book"))
    assert yaml.safe_load(after) == expected  # 5e-05 of the preset is still a number, as the stages read it
    load_params(project / "params.yaml", STAGES["pretrain"].load().PARAMS)
