"""The installed layout: one import package, ``ecgbridge``; the repository folders are its subpackages."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Repository folders that are installed as ``ecgbridge.<name>``; importing them bare is a bug.
FOLDERS = ("gateway", "mapping", "inference", "training", "outbound", "worker")
SOURCES = ("ecgbridge", *FOLDERS, "tests", "bench")


def _python_files() -> list[Path]:
    return [p for top in SOURCES for p in (ROOT / top).rglob("*.py") if "node_modules" not in p.parts]


def _bare_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in FOLDERS]
    return found


def test_no_module_imports_a_repository_folder_by_its_bare_name() -> None:
    offenders = [hit for path in _python_files() for hit in _bare_imports(path)]
    assert not offenders, "import these through ecgbridge.<folder>:\n" + "\n".join(offenders)


@pytest.mark.parametrize("name", FOLDERS)
def test_the_installed_package_exposes_no_generic_top_level_name(name: str, tmp_path: Path) -> None:
    # -I: no current directory, no PYTHONPATH; only what the install put in site-packages.
    probe = subprocess.run(
        [sys.executable, "-I", "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr
    ok = subprocess.run(
        [sys.executable, "-I", "-c", f"import ecgbridge.{name}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
