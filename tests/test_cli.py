"""The `nanoseek` command. (The package's dependency direction is checked by import-linter, whose
contracts are in pyproject.toml and which `make test` runs before pytest.)"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from nanoseek.cli import COMMANDS, main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_params_v3_671b_json(capsys):
    assert main(["params", "--preset", "v3_671b", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["total"] == 671_026_419_200
    assert abs(counts["activated"] / 1e9 - 37.55) < 0.01
    assert counts["total_with_mtp"] > counts["total"] and counts["activated_with_mtp"] > counts["activated"]


def test_params_from_config_json(tmp_path, capsys):
    from nanoseek.config import v3_671b
    (tmp_path / "config.json").write_text(json.dumps(v3_671b().to_hf_dict("v4")))
    assert main(["params", "--config", str(tmp_path / "config.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 671_026_419_200


def test_console_entry_point_runs():
    """`python -m nanoseek` is the CLI: the table it prints holds the counts of the tiny preset."""
    from nanoseek.config import tiny
    from nanoseek.model.params import param_counts
    out = subprocess.run([sys.executable, "-m", "nanoseek", "params", "--preset", "tiny"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    counts = param_counts(tiny())
    assert f"{counts['total']:,}" in out and f"{counts['activated']:,}" in out


def test_speedrun_dry_run_prints_every_stage_and_refuses_unknown_ones(tmp_path, capsys):
    """`nanoseek speedrun --dry-run`: the plan with a budget per stage and every command; runs nothing.
    (The smoke speedrun itself, killed and resumed, is tests/test_speedrun.py.)"""
    out = str(tmp_path / "run")
    assert main(["speedrun", "--preset", "smoke", "--out", out, "--dry-run"]) == 0
    text = capsys.readouterr().out
    for stage in ("corpus", "pretrain", "r1zero", "coldstart", "rl1", "rejection", "sft2", "r1", "distill",
                  "student_rl", "fp8", "eval", "report"):
        assert f" {stage} " in text, stage
    assert "total budget" in text and f"nanoseek grpo --init {out}/pretrain/model" in text
    assert not (tmp_path / "run").exists()
    assert main(["speedrun", "--preset", "smoke", "--out", out, "--force", "nope"]) == 2
    assert "unknown stage(s) nope" in capsys.readouterr().err


def test_every_registered_command_parses_its_help(capsys):
    """Each entry of the registry names a module with add_arguments/main, and `--help` shows its usage."""
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert f"usage: nanoseek {name}" in capsys.readouterr().out
