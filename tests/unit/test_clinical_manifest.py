"""The ECG + clinical-data manifest (training.clinical): PTB-XL and MIMIC-IV-ECG converters, and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

pytest.importorskip("pandas", reason="the training extra is not installed")

from ecgbridge.training.clinical import (
    ClinicalDataError,
    abnormality_targets,
    clinical_matrix,
    convert_unit,
    from_mimic_iv_ecg,
    from_ptbxl,
    read_manifest,
    write_manifest,
)
from tests.support.tiny_ptbxl import write_tiny_ptbxl

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MIMIC = FIXTURES / "mimic_iv_ecg_synthetic"


def test_ptbxl_manifest_has_biometrics_with_loinc_units_and_derived_bmi(tmp_path: Path) -> None:
    root = write_tiny_ptbxl(
        tmp_path / "ptbxl",
        [
            (1, 11, 70.0, 0, 180.0, 100.0, "{'NORM': 100.0}", 1),
            (2, 12, 300.0, 1, "", 60.0, "{'ASMI': 100.0}", 9),  # age 300 = over 89; no height -> no BMI
            (3, 13, 40.0, 1, "", "", "{'CLBBB': 100.0}", 10),
        ],
    )
    manifest = from_ptbxl(root)
    assert [r.ecg_id for r in manifest.rows] == ["ptbxl-1", "ptbxl-2", "ptbxl-3"]
    first = manifest.rows[0]
    assert first.split == "1" and first.patient_id == "11" and first.ecg_time == "1990-01-01T10:00:00"
    assert first.value("30525-0") == 70.0 and first.value("46098-0") == 1.0  # PTB-XL sex 0 = male
    assert first.value("39156-5") == pytest.approx(100 / 1.8**2)
    assert {m.unit for m in first.variables} == {"a", "1", "cm", "kg", "kg/m2"}
    assert manifest.rows[1].value("30525-0") == 90.0 and math.isnan(manifest.rows[1].value("39156-5"))
    # round trip through the file format
    path = write_manifest(manifest, tmp_path / "out" / "manifest.jsonl")
    header = json.loads(path.read_text().splitlines()[0])
    assert header["format"] == "ecgbridge-clinical-manifest" and header["ecg_root"] == str(root)
    again = read_manifest(path)
    assert again.rows == manifest.rows


def test_mimic_layout_and_labs_convert_into_the_manifest() -> None:
    manifest = from_mimic_iv_ecg(MIMIC, MIMIC / "labs.csv", patients_csv=MIMIC / "patients.csv")
    by_id = {r.ecg_id: r for r in manifest.rows}
    assert set(by_id) == {"mimic-40000001", "mimic-40000002", "mimic-40000003"}
    assert manifest.report["missing_ecg"] == ["mimic-40000004"]  # listed in record_list.csv, no WFDB files
    ecg1 = by_id["mimic-40000001"]
    assert ecg1.patient_id == "10000001" and ecg1.ecg_time == "2180-07-23T08:44:00"
    assert ecg1.value("2823-3") == pytest.approx(5.9)  # potassium by itemid, mEq/L = mmol/L
    assert ecg1.value("2160-0") == pytest.approx(1.1)  # the 3-day-old creatinine is outside the window
    assert ecg1.value("30525-0") == 71 and ecg1.value("46098-0") == 1.0
    assert ecg1.statements == ("Sinus rhythm", "Normal ECG")
    assert by_id["mimic-40000002"].value("33762-6") == 1250.0
    assert by_id["mimic-40000003"].value("718-7") == pytest.approx(10.5)  # 105 g/L -> g/dL
    assert by_id["mimic-40000003"].value("46098-0") == 0.0
    assert ecg1.split == by_id["mimic-40000002"].split  # one patient, one fold
    assert manifest.record_path(ecg1).with_suffix(".hea").is_file()
    kept, targets = abnormality_targets(manifest.rows)
    assert "male_sex" in [a.code for a in kept]


def test_unknown_unit_is_refused_naming_the_variable(tmp_path: Path) -> None:
    assert convert_unit("8302-2", 70.0, "[in_i]") == (pytest.approx(177.8), "cm")
    assert convert_unit("2160-0", 88.42, "umol/L") == (pytest.approx(1.0), "mg/dL")
    with pytest.raises(ClinicalDataError, match=r"potassium \(LOINC 2823-3\): unknown unit 'mg/dL'"):
        convert_unit("2823-3", 20.0, "mg/dL")
    labs = tmp_path / "labs.csv"
    labs.write_text("subject_id,charttime,itemid,valuenum,valueuom\n10000001,2180-07-23 06:00:00,51222,9,furlongs\n")
    with pytest.raises(ClinicalDataError, match=r"labs.csv:2: hemoglobin \(LOINC 718-7\): unknown unit 'furlongs'"):
        from_mimic_iv_ecg(MIMIC, labs)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps(
            {
                "ecg_id": "a",
                "patient_id": "1",
                "ecg_path": "x",
                "variables": [{"loinc": "29463-7", "value": 3, "unit": "stone"}],
            }
        )
        + "\n"
    )
    with pytest.raises(ClinicalDataError, match=r"m.jsonl:1: weight \(LOINC 29463-7\): unknown unit 'stone'"):
        read_manifest(manifest, check_files=False)


def test_rows_without_an_ecg_file_are_reported_and_left_out(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    shutil.copytree(MIMIC, folder)
    shutil.rmtree(folder / "files" / "p1000" / "p10000002")
    manifest = from_mimic_iv_ecg(folder)
    assert sorted(manifest.report["missing_ecg"]) == ["mimic-40000003", "mimic-40000004"]
    assert manifest.report["rows_read"] == 4 and manifest.report["rows"] == 2


def test_a_patient_in_two_splits_is_refused(tmp_path: Path) -> None:
    rows = [
        {"ecg_id": "a", "patient_id": "7", "ecg_path": "a", "split": "1", "variables": []},
        {"ecg_id": "b", "patient_id": "7", "ecg_path": "b", "split": "10", "variables": []},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ClinicalDataError, match=r"1 patients appear in more than one split.*patient 7 in splits 1, 10"):
        read_manifest(path, check_files=False)
    root = write_tiny_ptbxl(
        tmp_path / "ptbxl",
        [(1, 5, 50.0, 0, "", 70.0, "{'NORM': 100.0}", 1), (2, 5, 51.0, 0, "", 71.0, "{'NORM': 100.0}", 10)],
    )
    with pytest.raises(ClinicalDataError, match="leakage"):
        from_ptbxl(root)


def test_a_variable_missing_everywhere_is_dropped_with_a_warning() -> None:
    manifest = from_mimic_iv_ecg(MIMIC, MIMIC / "labs.csv")
    with pytest.warns(UserWarning, match=r"troponin_t \(LOINC 6598-7\) is missing in every row: dropped"):
        kept, values, mask, dropped = clinical_matrix(manifest.rows, ["2823-3", "6598-7", "718-7"])
    assert kept == ["2823-3", "718-7"] and dropped == ["6598-7"]
    assert values.shape == mask.shape == (3, 2)
    assert mask.sum(axis=0).tolist() == [1.0, 1.0]


def test_stored_ehr_context_becomes_manifest_measurements_in_its_units() -> None:
    """--from-store: the EHR context's canonical units converted through UNIT_FACTORS, other codes kept."""
    from ecgbridge.training.clinical import measurements_from_ehr_context

    context = {
        "age_years": 93.4,
        "sex": "other",
        "values": {
            "creatinine": {"value": 1.2, "unit": "mg/dL", "loinc": "14682-9", "effective": "2026-01-01T08:00:00+00:00"},
            "troponin": {"value": 20.0, "unit": "ng/L", "loinc": "67151-1", "effective": None},
            "nt_probnp": {"value": 420.0, "unit": "pg/mL", "loinc": "33763-4"},
            "systolic_bp": {"value": 16.0, "unit": "kPa", "loinc": "8480-6"},
            "egfr": {"value": 70.0, "unit": "mL/min/{1.73_m2}", "loinc": "62238-1"},
        },
    }
    got = {m.loinc: m for m in measurements_from_ehr_context(context, ecg_time="2026-01-01T10:00:00+00:00")}
    assert got["30525-0"].value == 90.0 and got["30525-0"].time == "2026-01-01T10:00:00+00:00"  # capped
    assert "46098-0" not in got  # "other": missing, not guessed
    assert got["2160-0"].value == 1.2 and got["2160-0"].time == "2026-01-01T08:00:00+00:00"
    assert got["6598-7"].value == pytest.approx(0.02) and got["6598-7"].unit == "ng/mL"  # hs troponin T
    assert got["33762-6"].value == 420.0 and got["8480-6"].value == pytest.approx(120.0, rel=1e-4)
    assert got["62238-1"].unit == "mL/min/{1.73_m2}"  # not a manifest variable: kept as written
    troponin_i = {"troponin": {"value": 5.0, "unit": "ng/L", "loinc": "89579-7"}}
    assert [m.loinc for m in measurements_from_ehr_context({"values": troponin_i}, ecg_time=None)] == ["89579-7"]
    with pytest.raises(ClinicalDataError, match=r"m1: potassium \(LOINC 2823-3\): unknown unit 'mg'"):
        measurements_from_ehr_context(
            {"values": {"potassium": {"value": 4, "unit": "mg", "loinc": "2823-3"}}}, ecg_time=None, where="m1: "
        )
