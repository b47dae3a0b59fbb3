"""The `llm-pipeline` console command: its subcommands, their help, and generation from a checkpoint."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import BIN, stage_env
from gpt.checkpoint import save_model
from gpt.model import GPTConfig, GPTModel
from pipeline.commands.cli import COMMANDS

CLI = BIN / "llm-pipeline"


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *args], cwd=cwd, env=stage_env(None), capture_output=True, text=True,
                          timeout=300)


def test_help_lists_every_subcommand(tmp_path: Path):
    result = cli(tmp_path, "--help")
    assert result.returncode == 0
    for name, (_, text) in COMMANDS.items():
        assert f"{name:<10}{text}" in result.stdout
    assert {"generate", "chat", "classify", "review", "run", "flow"} <= set(COMMANDS)
    unknown = cli(tmp_path, "train-everything")
    assert unknown.returncode == 2 and "invalid choice: 'train-everything'" in unknown.stderr


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_subcommand_has_its_own_help(tmp_path: Path, name: str):
    result = cli(tmp_path, name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: llm-pipeline {name}")
    # The description says what the command does, beyond the usage line.
    assert len(result.stdout.split("\n\n")[1].split()) >= 5, result.stdout


@pytest.mark.slow(90)
def test_generate_from_a_checkpoint_is_seeded(tmp_path: Path, bpe_dir: Path):
    shutil.copytree(bpe_dir, tmp_path / "data" / "raw" / "gpt2_bpe")
    torch.manual_seed(0)
    save_model(GPTModel(GPTConfig.from_preset("micro")), tmp_path / "data" / "models" / "base")
    args = ("generate", "--max-new-tokens", "8", "--temperature", "1.0", "Hello there")
    first, second = cli(tmp_path, *args), cli(tmp_path, *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("Hello there") and len(first.stdout) > len("Hello there\n")
    assert first.stdout == second.stdout  # same --seed, same continuation
    other = cli(tmp_path, *args, "--seed", "7")
    assert other.returncode == 0 and other.stdout != first.stdout

    # The fused decoding step continues greedily with the same text.
    greedy = ("generate", "--max-new-tokens", "12", "--temperature", "0", "Hello there")
    plain, fast = cli(tmp_path, *greedy), cli(tmp_path, *greedy, "--fast-decode")
    assert fast.returncode == 0 and "unavailable" not in fast.stderr, fast.stderr
    assert fast.stdout == plain.stdout
    uri = cli(tmp_path, *greedy, "--fast-decode", "--model", "models:/gpt-base@champion")
    assert uri.returncode == 2 and "--fast-decode needs a local checkpoint folder" in uri.stderr
