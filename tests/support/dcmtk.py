"""Is DCMTK (the independent DICOM peer of ``tests/interop``) what ``storescu`` / ``echoscu`` run?

pynetdicom installs console scripts of the same names into the virtual environment; with the
environment activated they come first on PATH, take none of DCMTK's options and are not an
independent implementation. So the check asks each tool for its version, not just for a file.
"""

from __future__ import annotations

import shutil
import subprocess

__all__ = ["TOOLS", "dcmtk_unavailable"]

TOOLS = ("storescu", "echoscu")


def dcmtk_unavailable() -> str | None:
    """``None`` when ``storescu`` and ``echoscu`` on PATH are DCMTK's, else why not (for ``need``)."""
    for tool in TOOLS:
        path = shutil.which(tool)
        if path is None:
            return f"DCMTK is not installed: no {tool} on PATH (apt-get install dcmtk)"
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"cannot run {path} --version: {exc}"
        if "dcmtk" not in (out.stdout + out.stderr).lower():
            return (
                f"{path} is not DCMTK's {tool} (pynetdicom's, from an activated virtualenv?); put DCMTK first on PATH"
            )
    return None
