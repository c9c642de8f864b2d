"""What the Node.js test peers (the FHIR server, the OpenID Connect provider) share: is node usable here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

__all__ = ["MIN_NODE", "node_executable", "node_unavailable"]

#: Both peers' packages need Node >= 20.19.
MIN_NODE = (20, 19)


def node_executable(env_var: str) -> str | None:
    return shutil.which(os.environ.get(env_var, "node"))


def node_unavailable(env_var: str, what: str, package_dir: Path, install_hint: str) -> str | None:
    """``None`` when node runs and ``package_dir`` is installed, else why not (for ``tests.support.peers.need``)."""
    node = node_executable(env_var)
    if node is None:
        return f"node is not on PATH ({what} needs Node >= 20.19)"
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run {node} --version: {exc}"
    match = re.match(r"v(\d+)\.(\d+)", out)
    if not match or (int(match.group(1)), int(match.group(2))) < MIN_NODE:
        return f"node {out or '?'} is too old for {what} (needs >= 20.19)"
    if not package_dir.is_dir():
        return f"{what}'s packages are not installed: {install_hint}"
    return None
