"""The console in a real headless Chromium against a real deployment.

Real parts: Redis, a worker process and a gateway process (``ecgbridge worker`` /
``ecgbridge gateway``), the Medplum FHIR server, DCMTK's ``storescu`` (pynetdicom where
DCMTK is missing), the first admin made with the documented command. The scenario is an
IT shift: sign in, watch ECGs arrive, open one in the viewer with its heatmap, find the
deliveries dead-lettered while the EHR was down, replay them once it is back (each
delivered exactly once), ask why a message took its route, and reload a broken route
file (its error shown, the rules in force unchanged). Screenshots: build/test-artifacts/.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.support.browser import canvas_ink, chromium, screenshot
from tests.support.console import PASSWORD
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
N_ECGS = 5


def _reports(fhir, sop_uid: str) -> list[dict]:
    bundle = fhir.search("DiagnosticReport", identifier=f"urn:dicom:uid|urn:oid:{sop_uid}")
    return [e["resource"] for e in bundle.get("entry", [])]


def _send(stack, paths: list[Path]) -> None:
    if shutil.which("storescu"):
        subprocess.run(
            ["storescu", "-aet", "CART1", "-aec", "ECGBRIDGE", "127.0.0.1", str(stack.port), *map(str, paths)],
            check=True,
            capture_output=True,
            timeout=60,
        )
    else:  # pragma: no cover - CI has DCMTK
        from tests.support.stack import send_dicom

        assert send_dicom(stack.port, [dcmread(p) for p in paths], ae_title="CART1") == [0] * len(paths)


def _by_css(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def _wait_css(driver, css: str, timeout_s: float = 20.0):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def test_an_it_shift_in_the_console(make_stack, fhir_server, waveform_ecg_path, tmp_path: Path) -> None:
    stack = make_stack(
        fhir_base_url=fhir_server.base_url,
        extra={"delivery": {"max_attempts": 2, "backoff_initial_s": 0.2, "backoff_max_s": 0.5}},
    )
    admin = subprocess.run(
        [
            sys.executable,
            "-m",
            "ecgbridge",
            "users",
            "add",
            "admin",
            "--role",
            "admin",
            "--password-stdin",
            "--config",
            str(stack.config),
        ],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert admin.returncode == 0, admin.stderr
    stack.start_worker()
    stack.start_gateway()
    url = f"http://127.0.0.1:{stack.console_port}"

    ecgs = []
    for i in range(N_ECGS):
        ds = dcmread(waveform_ecg_path)
        ds.SOPInstanceUID = generate_uid()
        ds.PatientName = "Doe^Jane" if i else "<script>alert(1)</script>^Test"
        path = tmp_path / f"ecg{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        ecgs.append((path, str(ds.SOPInstanceUID)))

    with chromium() as driver:
        driver.get(url + "/")
        assert driver.current_url.endswith("/login")
        screenshot(driver, "login")
        _by_css(driver, "#username").send_keys("admin")
        _by_css(driver, "#password").send_keys(PASSWORD)
        _by_css(driver, "form.login button").click()
        _wait_css(driver, "#listeners")
        assert "Dashboard" in driver.title

        # 1. the EHR is down: five ECGs arrive, are analysed, and their deliveries die
        fhir_server.stop()
        try:
            sent_at = time.monotonic()
            _send(stack, [p for p, _ in ecgs])
            driver.get(url + "/")
            counted = _by_css(driver, '[data-count="received-dicom"]').text
            seen_after = time.monotonic() - sent_at
            assert counted == str(N_ECGS), counted
            assert seen_after < 2.0, f"the dashboard showed the ECGs {seen_after:.1f} s after storescu returned"
            store = stack.store()
            wait_for(
                lambda: len([d for m in store.list() for d in store.deliveries(m.id) if d.state == "dead"]) == N_ECGS,
                90,
                0.5,
                f"{N_ECGS} dead-lettered deliveries",
            )
            driver.get(url + "/")
            assert _by_css(driver, "#destinations").text.count(str(N_ECGS)) >= 1
            screenshot(driver, "dashboard", readme=True)
        finally:
            fhir_server.start()

        # 2. the message browser finds one by its SOP Instance UID; the viewer draws it with a heatmap
        first_sop = ecgs[0][1]
        driver.get(url + f"/messages?q={first_sop}")
        rows = driver.find_elements("css selector", "#message-list tbody tr")
        assert len(rows) == 1
        rows[0].find_element("css selector", "a").click()
        viewer = _wait_css(driver, "[data-ecg-viewer]")
        wait_for(lambda: viewer.get_attribute("data-state") in ("ready", "error"), 30, 0.2, "the viewer")
        assert viewer.get_attribute("data-state") == "ready"
        assert "<script>" not in driver.page_source.split("</title>")[0]
        assert "&lt;script&gt;" in driver.page_source  # the patient name, escaped
        from selenium.webdriver.support.ui import Select

        heatmap = Select(_by_css(driver, '[data-ctl="heatmap"]'))
        options = [o.get_attribute("value") for o in heatmap.options if o.get_attribute("value")]
        assert options, "no heatmap to choose"
        heatmap.select_by_value(options[0])
        canvas = _by_css(driver, '[data-ctl="canvas"]')
        assert canvas_ink(driver, canvas) > 2000, "the ECG drawing is blank"
        driver.execute_script("arguments[0].scrollIntoView()", viewer)
        screenshot(driver, "viewer", readme=True)

        # 3. dead letters: count first, then one replay delivers each exactly once
        driver.get(url + "/dead-letters")
        assert len(driver.find_elements("css selector", "section[id^=dest-] tbody tr")) == N_ECGS
        screenshot(driver, "dead-letters")
        _by_css(driver, "section#dest-ehr form button").click()
        _wait_css(driver, "#confirm-replay").click()
        _wait_css(driver, "#replay-outcome")
        assert f"Replayed {N_ECGS}" in _by_css(driver, "#replay-outcome").text
        stack.wait_state("delivered", count=N_ECGS, timeout_s=120)
        for _, sop in ecgs:
            assert len(_reports(fhir_server, sop)) == 1
        driver.get(url + "/dead-letters")
        assert _by_css(driver, "#no-dead-letters")

        # 4. why did it take its route?
        message_id = stack.store().list()[0].id
        driver.get(url + "/routes")
        _by_css(driver, 'input[name="message_id"]').send_keys(message_id)
        _by_css(driver, 'form[action="/routes/explain"] button').click()
        assert "all-ecg" in _wait_css(driver, "#matched-route").text
        screenshot(driver, "routes-explain")

        # 5. a broken route file: its error is shown, the rules in force stay
        broken = yaml.safe_load(stack.config.read_text())
        broken["routes"][0]["destinations"] = ["no-such-ehr"]
        stack.config.write_text(yaml.safe_dump(broken, sort_keys=False))
        driver.get(url + "/config")
        _by_css(driver, "#reload").click()
        outcome = _wait_css(driver, "#reload-outcome").text
        assert "Not reloaded" in outcome and "no-such-ehr" in outcome and f"{stack.config}:" in outcome
        screenshot(driver, "config-error")
        driver.get(url + "/routes")
        assert "ehr" in _by_css(driver, "#routes").text and "no-such-ehr" not in _by_css(driver, "#routes").text
    assert "Doe" not in stack.logs() and "Jane" not in stack.logs()
