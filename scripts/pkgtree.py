"""Mirror the installed layout of ``ecgbridge`` as a tree of symbolic links, for static tools.

The repository's top-level folders are subpackages of ``ecgbridge`` through setuptools'
``package-dir`` (pyproject.toml). Python finds them through the editable install's import
hook, but static tools (import-linter's grimp, mypy) walk directories and cannot follow
that hook. This writes ``build/pkgtree/ecgbridge/...`` with real folders and one link per
source file, so those tools see the package exactly as it is installed; error paths are
mapped back to the repository by ``scripts/lint.sh``.
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(target: Path) -> Path:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    packages: list[str] = config["packages"]
    package_dir: dict[str, str] = config["package-dir"]
    if target.exists():
        shutil.rmtree(target)
    for package in packages:
        # the source folder of a package: its own mapping, or its parent's mapping plus the rest
        parts = package.split(".")
        for n in range(len(parts), 0, -1):
            mapped = package_dir.get(".".join(parts[:n]))
            if mapped is not None:
                source = ROOT / mapped / Path(*parts[n:])
                break
        else:
            source = ROOT / Path(*parts)
        dest = target / Path(*parts)
        dest.mkdir(parents=True, exist_ok=True)
        for file in source.iterdir():
            if file.is_file() and (file.suffix in (".py", ".pyi") or file.name == "py.typed"):
                (dest / file.name).symlink_to(file)
    return target


if __name__ == "__main__":
    out = build(ROOT / (sys.argv[1] if len(sys.argv) > 1 else "build/pkgtree"))
    print(out)
