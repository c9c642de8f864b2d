"""mapping.fhir_measurements: one LOINC-coded FHIR R4 Observation per ECG measurement.

Why: the EHR charts these values (flowsheets, QTc alerts) by LOINC code and UCUM unit,
and re-delivery must not duplicate them (identifiers for conditional create).
Round trip: build, validate with fhir.resources R4B, serialize, parse back, compare.
"""

from __future__ import annotations

import json
import math

import pytest
from fhir.resources.R4B.observation import Observation

from ecgbridge.mapping.fhir_measurements import FHIR_MEASUREMENTS, measurement_observations, measurement_panel
from ecgbridge.mapping.fhir_report import identifier_query

SUBJECT = {"type": "Patient", "identifier": {"system": "urn:ecgbridge:patient-id", "value": "MRN-0042"}}
BASE = "urn:oid:1.2.826.0.1.3680043.8.498.1/ecgbridge-measurements/0.1.0"
MEASURED = {
    "heart_rate": 61.1,
    "pr_interval": 156.0,
    "qrs_duration": 71.0,
    "qt_interval": 379.0,
    "qtc_interval": 382.3,
    "p_axis": 76.9,
    "qrs_axis": 48.0,
    "t_axis": 57.9,
}


def build(measurements: dict, **kw) -> list[dict]:  # type: ignore[type-arg]
    args: dict = {
        "subject": SUBJECT,
        "effective": "2013-01-25T10:59:19+01:00",
        "device_ref": "urn:uuid:1234",  # type: ignore[type-arg]
        "identifier_base": BASE,
    }
    args.update(kw)
    return measurement_observations(measurements, **args)  # type: ignore[arg-type]


def by_code(observations: list[dict]) -> dict[str, dict]:  # type: ignore[type-arg]
    return {o["code"]["coding"][0]["code"]: o for o in observations}


def test_one_observation_per_measurement_with_loinc_and_ucum() -> None:
    obs = by_code(build(MEASURED))
    expected = {
        "8867-4": (61.1, "/min"),
        "8625-6": (156.0, "ms"),
        "8633-0": (71.0, "ms"),
        "8634-8": (379.0, "ms"),
        "8636-3": (382.3, "ms"),
        "8626-4": (76.9, "deg"),
        "8632-2": (48.0, "deg"),
        "8638-9": (57.9, "deg"),
    }
    assert set(obs) == set(expected)
    for code, (value, unit) in expected.items():
        q = obs[code]["valueQuantity"]
        assert (q["value"], q["code"], q["system"]) == (value, unit, "http://unitsofmeasure.org"), code
        o = obs[code]
        assert o["status"] == "preliminary"
        assert o["category"][0]["coding"][0]["code"] == "procedure"
        assert o["code"]["coding"][0]["system"] == "http://loinc.org"
        assert o["subject"] == SUBJECT and o["effectiveDateTime"] == "2013-01-25T10:59:19+01:00"
        assert o["device"] == {"reference": "urn:uuid:1234"}
        assert "NOT FOR CLINICAL USE" in o["note"][0]["text"]
    # our QTc is Bazett's: the Bazett code is a second coding of the same Observation
    assert [c["code"] for c in obs["8636-3"]["code"]["coding"]] == ["8636-3", "76635-2"]


def test_round_trip_through_the_r4b_model() -> None:
    for resource in build(MEASURED):
        parsed = Observation.model_validate_json(json.dumps(resource))
        back = json.loads(parsed.model_dump_json(exclude_none=True))
        assert back["code"] == resource["code"]
        assert back["valueQuantity"]["value"] == resource["valueQuantity"]["value"]
        assert back["identifier"] == resource["identifier"]


def test_identifiers_are_stable_and_unique() -> None:
    first, second = build(MEASURED), build(dict(MEASURED))
    ids = [o["identifier"][0]["value"] for o in first]
    assert ids == [o["identifier"][0]["value"] for o in second]
    assert len(set(ids)) == len(ids)
    assert ids[0] == f"{BASE}/heart_rate"
    assert all(o["identifier"][0]["system"] == "urn:ecgbridge:result" for o in first)
    # what the deliverer sends as If-None-Exist
    assert identifier_query("urn:ecgbridge:result", ids[0]).startswith("identifier=urn%3Aecgbridge%3Aresult%7C")


def test_fridericia_rr_and_bazett_alias() -> None:
    obs = by_code(build({"qtc_bazett": 401.04, "qtc_fridericia": 395.5, "rr_interval": 982.0}))
    assert obs["8636-3"]["valueQuantity"]["value"] == 401.0  # rounded to 0.1
    assert obs["76634-5"]["valueQuantity"]["value"] == 395.5
    assert obs["8637-1"]["valueQuantity"]["code"] == "ms"
    with pytest.raises(ValueError, match="differ"):
        build({"qtc_interval": 400.0, "qtc_bazett": 410.0})
    assert len(build({"qtc_interval": 400.0, "qtc_bazett": 400.0})) == 1


def test_unusable_values_and_unknown_keys_are_left_out() -> None:
    obs = build(
        {
            "heart_rate": None,
            "pr_interval": math.nan,
            "qrs_duration": True,
            "qt_interval": "380",
            "sokolow_lyon": 3.1,
            "lvef": 35.0,
            "t_axis": -12,
        }
    )
    assert [o["code"]["coding"][0]["code"] for o in obs] == ["8638-9"]
    assert obs[0]["valueQuantity"]["value"] == -12.0
    assert build({}) == []


def test_optional_context_and_required_identifier() -> None:
    (obs,) = build({"heart_rate": 70}, subject=None, effective=None, device_ref=None, issued="2024-03-01T10:20:00Z")
    assert "subject" not in obs and "effectiveDateTime" not in obs and "device" not in obs
    assert obs["issued"] == "2024-03-01T10:20:00Z"
    with pytest.raises(ValueError):
        build({"heart_rate": 70}, identifier_base="")


def test_every_mapped_key_has_a_valid_observation() -> None:
    values = {key: 100.0 for key in FHIR_MEASUREMENTS}
    assert len(build(values)) == len(FHIR_MEASUREMENTS)


def test_from_the_pipeline_output(waveform_ecg_path) -> None:  # type: ignore[no-untyped-def]
    import pydicom

    from ecgbridge.inference.pipeline import measurement_output
    from ecgbridge.mapping.dicom_waveform import to_ecg

    out = measurement_output(to_ecg(pydicom.dcmread(waveform_ecg_path)))
    merged = {
        **out.extra["measurements"],
        "qtc_fridericia": out.extra["features"]["qtc_fridericia"],
        "rr_interval": out.extra["features"]["rr_interval"],
    }
    obs = by_code(build(merged))
    assert {"8867-4", "8625-6", "8633-0", "8634-8", "8636-3", "76634-5", "8637-1", "8626-4", "8632-2", "8638-9"} == set(
        obs
    )


def test_the_panel_carries_what_the_separate_observations_carry() -> None:
    """``measurements: panel``: one Observation, a component per measurement, the same codes and values."""
    separate = build(MEASURED)
    panel = measurement_panel(
        MEASURED,
        subject=SUBJECT,
        effective="2013-01-25T10:59:19+01:00",
        device_ref="urn:uuid:1234",
        identifier_base=BASE,
    )
    assert panel is not None
    Observation.model_validate(panel)  # R4B
    assert panel["code"]["coding"][0]["code"] == "34534-8"
    assert panel["identifier"][0]["value"] == f"{BASE}/panel"
    assert [c["code"] for c in panel["component"]] == [o["code"] for o in separate]
    assert [c["valueQuantity"] for c in panel["component"]] == [o["valueQuantity"] for o in separate]
    assert panel["subject"] == SUBJECT and panel["device"] == {"reference": "urn:uuid:1234"}
    assert "not for clinical use" in panel["note"][0]["text"].lower()
    assert measurement_panel({}, subject=None, effective=None, device_ref=None, identifier_base=BASE) is None
    with pytest.raises(ValueError, match="differ"):
        measurement_panel(
            {"qtc_interval": 400, "qtc_bazett": 410},
            subject=None,
            effective=None,
            device_ref=None,
            identifier_base=BASE,
        )
