"""The `nanoseek` command and the package's dependency direction."""
from __future__ import annotations

import ast
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
    out = subprocess.run([sys.executable, "-m", "nanoseek", "params", "--preset", "tiny"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    assert "activated" in out


def test_speedrun_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["speedrun", "--steps", "3", "--seq-len", "32", "--batch", "2", "--name", "t"]) == 0
    from nanoseek import load_pretrained
    model = load_pretrained(str(tmp_path / "runs" / "t" / "model"))
    assert len(model.mtp) == 1 and (tmp_path / "runs" / "t" / "model" / "tokenizer.json").exists()


MODEL_FILES = ["config.py", "rope.py", "layers.py", "cache.py", "mla.py", "attention.py", "moe.py", "mtp.py",
               "model.py"]


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_files_import_only_torch(name):
    allowed_top = {"torch", "__future__", "dataclasses", "math", "json", "os", "typing", "nanoseek"}
    for mod in _imports(ROOT / "nanoseek" / name):
        assert mod.split(".")[0] in allowed_top, f"{name} imports {mod}"
        if mod.startswith("nanoseek"):
            assert mod.split(".")[1] + ".py" in MODEL_FILES, f"{name} imports {mod}: model files import model files"


def test_nothing_imports_the_cli_or_transformers():
    for path in (ROOT / "nanoseek").rglob("*.py"):
        rel = path.relative_to(ROOT / "nanoseek").as_posix()
        mods = _imports(path)
        if rel != "cli.py" and rel != "__main__.py":
            assert "nanoseek.cli" not in mods, f"{rel} imports the CLI"
        if not rel.startswith(("bench/", "server/")) and rel not in ("hf.py",):
            assert not any(m.split(".")[0] == "transformers" for m in mods), f"{rel} imports transformers"


def test_every_registered_command_has_help():
    for name in COMMANDS:
        assert COMMANDS[name][1]
