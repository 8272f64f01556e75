"""The packages form a stack (pyproject.toml's import-linter contract): a lower package never imports a
higher one. The contract is checked here, shown to catch a wrong import, and shown to cover every
module of the package (import-linter's `exhaustive` needs containers, which a root-level stack has not)."""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys

import tomllib
from conftest import ROOT

import gluetune

CONTRACT = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]


def lint_imports(package_parent, config) -> subprocess.CompletedProcess:
    """import-linter over the `gluetune` found in `package_parent`, in a process of its own."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.path.insert(0, {str(package_parent)!r}); "
            f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_the_packages_keep_the_stack():
    result = lint_imports(ROOT / "src", ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """config (low) importing training (high), as a careless edit would: the contract must say so."""
    shutil.copytree(ROOT / "src" / "gluetune", tmp_path / "gluetune")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    run_py = tmp_path / "gluetune" / "config" / "run.py"
    run_py.write_text(run_py.read_text() + "\n\ndef _train_now(config):\n    from ..training.run import train\n\n"
                                           "    return train(config)\n")
    result = lint_imports(tmp_path, tmp_path / "pyproject.toml")
    assert result.returncode == 1, result.stdout[-3000:]
    assert "BROKEN" in result.stdout and "gluetune.config.run -> gluetune.training.run" in result.stdout


def test_every_module_sits_in_a_layer():
    named = {name.strip() for layer in CONTRACT["layers"] for name in layer.replace("|", ":").split(":")}
    top_level = {f"gluetune.{module.name}" for module in pkgutil.iter_modules(gluetune.__path__)}
    assert top_level - named == set(), "modules outside the contract's layers (add them to pyproject.toml)"
    assert named - top_level == set(), "layers naming modules that do not exist"
