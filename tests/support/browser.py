"""Headless Chromium from Debian's packages, driven by selenium through Debian's chromedriver.

Nothing is downloaded: the browser and the driver are the system's (``apt-get install
chromium chromium-driver``); a test skips, saying so, where they are missing, and fails
in CI (``tests/support/peers.py``). Screenshots go to ``build/test-artifacts/`` (and, with
ECGBRIDGE_UPDATE_SCREENSHOTS=1, the ones the README shows are copied to ``docs/img/``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .peers import need

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "build" / "test-artifacts"
README_IMAGES = REPO / "docs" / "img"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

__all__ = ["chromium", "screenshot", "canvas_ink"]


@contextmanager
def chromium(width: int = 1366, height: int = 768) -> Iterator[object]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        need("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        need("selenium is not installed (the test extra)")

    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium fetch a driver
    profile = tempfile.mkdtemp(prefix="ecgbridge-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver: object, name: str, *, readme: bool = False) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))  # type: ignore[attr-defined]
    if readme and os.environ.get("ECGBRIDGE_UPDATE_SCREENSHOTS") == "1":
        README_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, README_IMAGES / f"{name}.png")
    return path


_INK = """
const canvas = arguments[0];
const ctx = canvas.getContext('2d');
const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
let dark = 0;
for (let i = 0; i < data.length; i += 4) {
  if (data[i + 3] > 200 && data[i] < 90 && data[i + 1] < 90 && data[i + 2] < 90) dark++;
}
return dark;
"""


def canvas_ink(driver: object, canvas: object) -> int:
    """How many near-black pixels the canvas holds: the trace, not the pink grid."""
    return int(driver.execute_script(_INK, canvas))  # type: ignore[attr-defined]
