"""Over-read statements -> the models' classes and tiers; the readers of ORU, SR, annotations and vendor XML.

Pure functions, real inputs where there are some: the cardiologists' own reports of PTB-XL
(``../shared/data/ptbxl-subset``, each with the codes the cardiologists gave it), a real
confirmed Philips export (``tests/fixtures/vendor``) and the Mortara ECG of pydicom's test data.
"""

from __future__ import annotations

import ast
import csv
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom import dcmread

from ecgbridge.errors import ReportError
from ecgbridge.mapping.codes import SCP_SEVERITY, SCP_SUPERCLASS
from ecgbridge.mapping.overread import (
    SUPERCLASSES,
    TEXT_STATEMENTS,
    Statement,
    map_statements,
    normalise,
)
from ecgbridge.mapping.overread_readers import read_ecg_annotations, read_oru, read_sr, read_vendor_xml
from ecgbridge.mapping.vendor._xml import parse
from tests.support.overreads import build_sr, code_item, overread_oru, text_item

REPO = Path(__file__).resolve().parents[2]
VENDOR = REPO / "tests" / "fixtures" / "vendor"


def _text(*texts: str):  # type: ignore[no-untyped-def]
    return map_statements([Statement(text=t) for t in texts])


def _present(label) -> set[str]:  # type: ignore[no-untyped-def]
    return {c for c, v in (label.labels or {}).items() if v}


# ----- the wording table ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("wording", "concept"),
    [
        ("SINUS RHYTHM", "scp:SR"),
        ("NORMAL SINUS RHYTHM", "scp:SR"),
        ("ANTERIOR INFARCT, AGE UNDETERMINED", "scp:AMI"),
        ("Anterior infarction , age undetermined", "scp:AMI"),
        ("LEFT VENTRICULAR HYPERTROPHY", "scp:LVH"),
        ("LVH", "scp:LVH"),
        ("RIGHT BUNDLE BRANCH BLOCK", "scp:CRBBB"),
        ("RBBB", "scp:CRBBB"),
        ("Incomplete right bundle-branch block", "scp:IRBBB"),
        ("LEFT ANTERIOR HEMIBLOCK", "scp:LAFB"),
        ("WITH 1ST DEGREE A-V BLOCK", "scp:1AVB"),
        ("ATRIAL FIBRILLATION WITH RAPID VENTRICULAR RESPONSE", "scp:AFIB"),
        ("NONSPECIFIC ST AND T WAVE ABNORMALITY", "scp:NST_"),
        ("Non-specific ST-T changes", "scp:NST_"),
        ("INFERIOR ISCHAEMIA", "scp:ISCIN"),
        ("PROLONGED QT", "scp:LNGQT"),
        ("COMPLETE HEART BLOCK", "scp:3AVB"),
        ("VENTRICULAR TACHYCARDIA", "sct:164895002"),
        ("LEFT AXIS DEVIATION", "sct:39732003"),
        ("Sinusrhythmus", None),  # German: not in the table
    ],
)
def test_common_vendor_wordings_map_to_their_statement(wording: str, concept: str | None) -> None:
    label = _text(wording)
    found = [f.concept for f in label.findings]
    if concept is None:
        assert not found and label.unmatched == (wording,)
    else:
        assert found[-1] == concept and not label.unmatched, (found, label.unmatched)


def test_every_wording_of_the_table_maps_to_a_known_code() -> None:
    from ecgbridge.mapping.codes import SNOMED_SEVERITY, SNOMED_TO_SUPERCLASS

    for wording, concept in TEXT_STATEMENTS.items():
        kind, _, code = concept.partition(":")
        assert kind in ("scp", "sct"), wording
        assert code in (SCP_SEVERITY if kind == "scp" else {**SNOMED_SEVERITY, **SNOMED_TO_SUPERCLASS}), wording
        assert [f.concept for f in _text(wording).findings] == [concept], wording


def test_the_superclass_table_is_the_real_scp_statements_csv(shared_data: Path) -> None:
    with open(shared_data / "ptbxl-subset" / "scp_statements.csv", newline="") as fh:
        rows = {r[""]: r["diagnostic_class"] for r in csv.DictReader(fh) if r["diagnostic_class"]}
    assert rows == SCP_SUPERCLASS and len(rows) == 44


def test_a_read_gives_a_label_per_superclass_and_the_worst_tier() -> None:
    label = _text("SINUS RHYTHM", "ANTERIOR INFARCT, AGE UNDETERMINED", "RIGHT BUNDLE BRANCH BLOCK")
    assert label.labels == {"NORM": 0, "MI": 1, "STTC": 0, "CD": 1, "HYP": 0}
    assert (label.severity4, label.severity3) == ("major_nonurgent", "abnormal_nonurgent")
    assert label.complete and not label.uncertain


def test_a_read_naming_no_diagnosis_has_no_label_but_a_tier() -> None:
    label = _text("SINUS BRADYCARDIA")
    assert label.labels is None and label.severity4 == "minor_abnormality"
    assert _text("ABNORMAL ECG").labels is None and _text("ABNORMAL ECG").severity4 is None


def test_acute_makes_an_infarct_urgent() -> None:
    assert _text("INFERIOR INFARCT, ACUTE").severity4 == "urgent"
    assert _text("ACUTE MI").severity4 == "urgent"
    assert _text("INFERIOR INFARCT, AGE UNDETERMINED").severity4 == "major_nonurgent"


# ----- qualifiers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "qualifiers"),
    [
        ("POSSIBLE LEFT VENTRICULAR HYPERTROPHY", ["uncertain"]),
        ("CANNOT RULE OUT INFERIOR INFARCT, AGE UNDETERMINED", ["uncertain"]),
        ("Inferior infarct cannot be excluded", ["uncertain"]),
        ("BORDERLINE FIRST DEGREE AV BLOCK", ["uncertain"]),
        ("CONSIDER ANTERIOR ISCHEMIA", ["uncertain"]),
        ("PROBABLE LEFT ATRIAL ENLARGEMENT", ["uncertain"]),
        ("myocardial ischaemia is likely", ["uncertain"]),
        ("? LVH", ["uncertain"]),
        ("NO EVIDENCE OF INFARCT", ["negated"]),
        ("WITHOUT ST ELEVATION", ["negated"]),
        ("no ecg evidence of lvh or ischaemia", ["negated", "negated"]),
        ("SINUS RHYTHM WITH POSSIBLE LVH", ["confirmed", "uncertain"]),
        ("LEFT BUNDLE BRANCH BLOCK WITHOUT ST ELEVATION", ["confirmed", "negated"]),
        ("inferior infarct not excluded", ["uncertain"]),
    ],
)
def test_hedges_and_negations(text: str, qualifiers: list[str]) -> None:
    assert [f.qualifier for f in _text(text).findings] == qualifiers


def test_an_uncertain_finding_is_not_a_confirmed_positive() -> None:
    label = _text("SINUS RHYTHM", "POSSIBLE ANTERIOR INFARCT")
    assert label.labels == dict.fromkeys(SUPERCLASSES, 0) and label.uncertain == ("MI",)
    assert label.severity4 == "major_nonurgent"  # the triage labels count a "possible" finding
    negated = _text("NORMAL ECG", "NO EVIDENCE OF INFARCT")
    assert _present(negated) == {"NORM"} and negated.uncertain == () and negated.severity4 == "normal"


# ----- codes ------------------------------------------------------------------------------------------
def test_coded_statements_map_through_snomed_and_scp_ecg() -> None:
    label = map_statements(
        [
            Statement(code="164909002", text="Left bundle branch block", system="SCT"),
            Statement(code="IMI", system="SCPECG"),
            Statement(code="426783006", system="http://snomed.info/sct"),
            Statement(code="164854000", system="SNOMED-CT"),
        ]
    )
    assert [f.concept for f in label.findings] == ["sct:164909002", "scp:IMI", "sct:426783006", "sct:164854000"]
    assert _present(label) == {"CD", "MI", "NORM"} and label.severity4 == "major_nonurgent"
    assert map_statements([Statement(code="164909002", text="Possible LBBB", system="SCT")]).uncertain == ("CD",)


def test_an_unknown_code_falls_back_to_its_text_and_else_is_unmatched() -> None:
    label = map_statements([Statement(code="X-99", text="RIGHT BUNDLE BRANCH BLOCK", system="99MUSE")])
    assert [f.concept for f in label.findings] == ["scp:CRBBB"] and label.complete
    unknown = map_statements([Statement(code="X-98", system="99MUSE")])
    assert unknown.unmatched == ("X-98 (99MUSE)",) and unknown.severity4 is None


def test_statements_no_table_knows_are_listed_and_leave_no_tier() -> None:
    label = _text("SINUS RHYTHM", "WOBBLY BASELINE HUMPS", "ANTERIOR INFARCT, AGE UNDETERMINED")
    assert label.unmatched == ("WOBBLY BASELINE HUMPS",) and not label.complete
    assert _present(label) == {"MI"} and label.severity4 is None  # an unknown statement could be the worst


def test_normalise_expands_abbreviations_and_spellings() -> None:
    assert normalise("1st degree A-V block, LVH; ischaemia") == (
        "first degree av block left ventricular hypertrophy ischemia"
    )


def test_real_cardiologists_reports_of_ptbxl_agree_with_their_codes(shared_data: Path) -> None:
    """PTB-XL's English free-text reports vs the SCP codes its cardiologists gave the same records.

    Measured: about 0.86-0.94 agreement per superclass, the reports being longer and freer than
    an ECG system's statements (the codes also carry the cardiologists' second thoughts).
    """
    with open(shared_data / "ptbxl-subset" / "ptbxl_database.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if "rhythm" in r["report"] and "rhythmus" not in r["report"]]
    assert len(rows) > 200
    agree = dict.fromkeys(SUPERCLASSES, 0)
    for row in rows:
        truth = {SCP_SUPERCLASS[c] for c in ast.literal_eval(row["scp_codes"]) if c in SCP_SUPERCLASS}
        label = _text(row["report"])
        found = _present(label) | set(label.uncertain)
        for c in SUPERCLASSES:
            agree[c] += (c in found) == (c in truth)
    rates = {c: n / len(rows) for c, n in agree.items()}
    assert all(rate >= 0.84 for rate in rates.values()), rates
    assert rates["MI"] >= 0.9 and rates["CD"] >= 0.9, rates


# ----- readers ------------------------------------------------------------------------------------------
def test_oru_reader_takes_status_reader_times_orders_and_statements() -> None:
    text = overread_oru(
        "R1",
        ["SINUS RHYTHM", ("164909002", "Left bundle branch block", "SCT")],
        status="C",
        placer="PL9",
        accession="ACC9",
        acquired_at=datetime(2026, 3, 1, 10, 0, tzinfo=UTC),
        read_at=datetime(2026, 3, 1, 11, 0, tzinfo=UTC),
        sop_instance_uid="1.2.3.4",
    )
    read = read_oru(text)
    assert (read.kind, read.status, read.reader) == ("oru", "C", "Heart Anna")
    assert read.read_at == datetime(2026, 3, 1, 11, 0, tzinfo=UTC)
    assert read.refs.acquired_at == datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    assert (read.refs.placer_order_number, read.refs.accession_number) == ("PL9", "ACC9")
    assert read.refs.sop_instance_uids == ("1.2.3.4",) and read.patient_id == "MRN0001"
    assert read.statements == (
        Statement(text="SINUS RHYTHM"),
        Statement(text="Left bundle branch block", code="164909002", system="SCT"),
    )
    assert read.is_label and not read_oru(overread_oru("R2", ["SINUS RHYTHM"], status="P")).is_label


def test_sr_reader_takes_the_findings_the_reference_and_the_verification() -> None:
    ds = build_sr(
        [text_item("SINUS RHYTHM"), code_item("59118001", "SCT", "Right bundle branch block")],
        referenced=("1.2.840.10008.5.1.4.1.1.9.1.1", "1.2.3.99"),
        accession="ACC1",
    )
    read = read_sr(ds)
    assert (read.kind, read.status, read.reader, read.refs.sop_instance_uids) == (
        "sr",
        "F",
        "Heart Anna",
        ("1.2.3.99",),
    )
    assert read.statements == (
        Statement(text="SINUS RHYTHM"),
        Statement(text="Right bundle branch block", code="59118001", system="SCT"),
    )  # the language concept modifier is no statement
    assert read_sr(build_sr([text_item("SINUS RHYTHM")], verified=False)).status == "P"
    assert read_sr(build_sr([text_item("SINUS RHYTHM")], predecessor="1.2.3.5")).status == "C"


@pytest.mark.parametrize(
    ("breakage", "says"),
    [
        ("root_not_container", "root content item is not a CONTAINER"),
        ("no_title", "no ConceptNameCodeSequence"),
        ("no_value_type", "item 1.2.1 has no ValueType"),
        ("no_relationship", "item 1.2.1 has no RelationshipType"),
        ("text_without_value", "(TEXT) has no TextValue"),
        ("code_without_code", "(CODE) has no ConceptCodeSequence"),
        ("unknown_value_type", "unknown ValueType"),
    ],
)
def test_a_malformed_sr_content_tree_is_a_report_error_naming_the_item(breakage: str, says: str) -> None:
    ds = build_sr([text_item("SINUS RHYTHM"), code_item("59118001", "SCT", "Right bundle branch block")])
    item = ds.ContentSequence[1].ContentSequence[0]
    if breakage == "root_not_container":
        ds.ValueType = "TEXT"
    elif breakage == "no_title":
        del ds.ConceptNameCodeSequence
    elif breakage == "no_value_type":
        del item.ValueType
    elif breakage == "no_relationship":
        del item.RelationshipType
    elif breakage == "text_without_value":
        del item.TextValue
    elif breakage == "code_without_code":
        del ds.ContentSequence[1].ContentSequence[1].ConceptCodeSequence
    else:
        item.ValueType = "BLOB"
    with pytest.raises(ReportError, match=says.replace("(", r"\(").replace(")", r"\)")) as caught:
        read_sr(ds)
    assert caught.value.dimse_status == 0xA900


def test_the_statements_of_an_ecg_object_are_its_annotations(waveform_ecg_path: Path) -> None:
    ds = dcmread(str(waveform_ecg_path))
    read = read_ecg_annotations(ds)
    assert read is not None and read.refs.sop_instance_uids == (str(ds.SOPInstanceUID),)
    assert [s.text for s in read.statements] == ["RITMO SINUSALE", "ECG NORMALE"]  # measurements and marks left out
    assert map_statements(read.statements).unmatched == ("RITMO SINUSALE", "ECG NORMALE")  # Italian: listed


def test_a_real_confirmed_philips_export_carries_its_read_and_an_unconfirmed_one_none() -> None:
    read = read_vendor_xml(parse((VENDOR / "ad4d3d80-d165_1-04_orig.xml").read_bytes()))
    assert read is not None and read.status == "F" and read.reader and read.read_at is not None
    assert [s.text for s in read.statements] == [
        "SINUS BRADYCARDIA",
        "NO PREVIOUS TRACING AVAILABLE FOR COMPARISON",
        "OTHERWISE NORMAL ECG",
    ]
    label = map_statements(read.statements)
    assert _present(label) == {"NORM"} and label.complete and label.severity4 == "minor_abnormality"
    assert read_vendor_xml(parse((VENDOR / "3191723_ZZDEMOPTONLY_1-04_orig.xml").read_bytes())) is None


def test_the_documented_wording_table_is_the_codes() -> None:
    doc = (REPO / "docs" / "overread-statements.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip(" `") for line in doc.splitlines() if "| `s" in line}
    assert rows == TEXT_STATEMENTS


def test_the_overreads_settings_deny_by_default_and_are_checked_with_file_and_line(tmp_path: Path) -> None:
    from ecgbridge.core.settings import check_config, default_settings

    defaults = default_settings().overreads
    assert not defaults.hl7_source("MUSE") and not defaults.dicom_source("MUSE") and not defaults.inbox
    good = tmp_path / "good.yaml"
    good.write_text("overreads:\n  hl7_sending_applications: [MUSE]\n  dicom_calling_ae_titles: [MUSEDCM]\n")
    settings = check_config(good).settings
    assert settings is not None and settings.overreads.hl7_source("MUSE") and settings.overreads.dicom_source("MUSEDCM")
    bad = tmp_path / "bad.yaml"
    bad.write_text("overreads:\n  inbox: true\n  link_window_minutes: 10\n  link_window_min: 0\n")
    problems = check_config(bad).problems
    assert any(p.startswith(f"{bad}:3: overreads.link_window_minutes: unknown setting") for p in problems), problems
    assert any(p.startswith(f"{bad}:4: overreads.link_window_min") for p in problems), problems
