"""Serving the knowledge-transfer model's predicted clinical abnormalities (issue #14 item 4).

The manifest's ``explanations`` (and the older ``architecture.abnormality_heads``), the
``ModelOutput`` a real KT export gives (``tests/fixtures/models/diagnosis-kt-tiny``, written by
``tests/fixtures/make_kt_model.py`` with the real recipe), the quality gate, and what the FHIR
report, the HL7 ORU and the printout make of them: predictions, never measured values.
"""

from __future__ import annotations

import copy
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ecgbridge.errors import MappingError, ModelError
from ecgbridge.inference.models import HEAD_WORDING, Manifest, ModelRegistry, load_manifest, prepare_input
from ecgbridge.inference.quality import QualityReport, cap_for_quality
from ecgbridge.mapping.abnormality_result import (
    METHOD_SYSTEM,
    PREDICTED_ABNORMALITY_SYSTEM,
    SECTION_TITLE,
    predicted_abnormalities,
    sentence,
)
from ecgbridge.mapping.ecg import STANDARD_LEADS, AnalysisResult, Ecg, ModelOutput, Patient, Study
from ecgbridge.mapping.fhir_report import build_report, identifier_query
from ecgbridge.mapping.hl7_oru import build_oru_r01, validate_er7
from tests.support.results import sample_findings

KT_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "models" / "diagnosis-kt-tiny"
DICOM_ECG = Path(__file__).resolve().parents[1] / "fixtures" / "dicom" / "ptbxl_00622_mi_12lead.dcm"
LABEL = "NOT FOR CLINICAL USE"

PREDICTED = [
    {
        "code": "nt_probnp_high",
        "display": "elevated NT-proBNP",
        "loinc": "33762-6",
        "variable": "NT-proBNP",
        "criterion": "above 300 pg/mL",
        "probability": 0.81,
        "threshold": 0.5,
        "present": True,
        "measured": False,
    },
    {
        "code": "hemoglobin_low",
        "display": "low hemoglobin",
        "loinc": "718-7",
        "variable": "Hemoglobin",
        "criterion": "below 12 g/dL",
        "probability": 0.12,
        "threshold": 0.5,
        "present": False,
        "measured": False,
    },
]
LAB_LOINCS = {"33762-6", "718-7"}


def kt_output(predicted: list[dict[str, Any]] | None = None, **extra: Any) -> ModelOutput:
    return ModelOutput(
        "diagnosis-kt",
        "0.1.0",
        "diagnosis",
        sample_findings(),
        {"predicted_abnormalities": copy.deepcopy(PREDICTED if predicted is None else predicted), **extra},
    )


def kt_result(output: ModelOutput | None = None) -> AnalysisResult:
    return AnalysisResult("msg-kt-1", (output or kt_output(),))


def manifest_dict(**changes: Any) -> dict[str, Any]:
    data = json.loads((KT_FIXTURE / "manifest.json").read_text())
    data.update(changes)
    return data


def _report(result: AnalysisResult, **kw: Any) -> Any:
    return build_report(
        result,
        patient=Patient(id="MRN-1"),
        study=Study(sop_instance_uid="1.2.3.4", acquired_at=datetime(2024, 5, 2, 8, 30, tzinfo=UTC)),
        message_id="msg-kt-1",
        issued=datetime(2024, 5, 2, 8, 31, tzinfo=UTC),
        **kw,
    )


def _predicted_observations(bundle: Any) -> list[dict[str, Any]]:
    return [
        o.resource
        for o in bundle.observations
        if o.resource["code"]["coding"][0]["system"] == PREDICTED_ABNORMALITY_SYSTEM
    ]


# --------------------------------------------------------------------------- the manifest


def test_the_kt_fixture_manifest_names_its_heads_as_explanations() -> None:
    manifest = load_manifest(KT_FIXTURE)
    assert manifest.outputs["abnormalities"] == "abnormalities"
    assert [e.code for e in manifest.explanations or []] == ["age_over_65", "bmi_over_30", "male_sex"]
    first = (manifest.explanations or [])[0]
    assert (first.display, first.loinc, first.criterion, first.index) == (
        "age over 65 years",
        "30525-0",
        "above 65 years",
        0,
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["outputs"].pop("abnormalities"), "abnormalities"),
        (lambda d: d["explanations"][1].update(code="age_over_65"), "repeat a code"),
        (lambda d: d["explanations"][1].update(index=0), "repeat a index"),
        (lambda d: d["explanations"][0].update(loinc="NT-proBNP"), "loinc"),
        (lambda d: d["explanations"][0].update(threshold=1.5), "threshold"),
        (lambda d: d["explanations"][0].update(value=120.0), "value"),  # never a measured value
        (lambda d: d.update(explanations=[]), "explanations"),
    ],
)
def test_explanations_are_validated(change: Any, message: str) -> None:
    data = manifest_dict()
    change(data)
    with pytest.raises(ValueError, match=message):
        Manifest.model_validate(data)


def test_every_head_the_recipe_can_train_has_serving_words() -> None:
    from ecgbridge.training.clinical import ABNORMALITIES

    assert {a.code for a in ABNORMALITIES} <= set(HEAD_WORDING)


def test_a_manifest_with_only_architecture_heads_still_serves_them() -> None:
    """The first KT exports named their heads only under ``architecture.abnormality_heads``."""
    data = manifest_dict()
    data.pop("explanations")
    data["architecture"]["abnormality_heads"] = [
        {"code": "nt_probnp_high", "display": "NT-proBNP above 300 pg/mL", "loinc": "33762-6", "above": 300.0},
        {"code": "site_bnp_high", "display": "BNP above 100 pg/mL", "loinc": "30934-4", "above": 100.0},
    ]
    manifest = Manifest.model_validate(data)
    heads = manifest.explanations or []
    assert [(e.code, e.display, e.variable, e.criterion, e.index) for e in heads] == [
        ("nt_probnp_high", "elevated NT-proBNP", "NT-proBNP", "above 300 pg/mL", 0),
        ("site_bnp_high", "BNP above 100 pg/mL", "BNP above 100 pg/mL", "above 100", 1),
    ]
    # without an abnormalities output, or with heads that are not that shape, they are ignored
    no_output = copy.deepcopy(data)
    no_output["outputs"].pop("abnormalities")
    assert Manifest.model_validate(no_output).explanations is None
    malformed = copy.deepcopy(data)
    malformed["architecture"]["abnormality_heads"] = [{"display": "no code"}]
    assert Manifest.model_validate(malformed).explanations is None


# --------------------------------------------------------------------------- the model output


@pytest.fixture(scope="module")
def kt_model() -> Any:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    return ModelRegistry(paths={"diagnosis-kt": KT_FIXTURE}).signal_model("diagnosis-kt")


@pytest.fixture(scope="module")
def ecg() -> Ecg:
    from ecgbridge.mapping.readers import read_ecg_bytes

    return read_ecg_bytes(DICOM_ECG.read_bytes())


def test_the_kt_model_reads_its_abnormalities_output_as_predictions(kt_model: Any, ecg: Ecg) -> None:
    out = kt_model.run(ecg)
    assert [f.code for f in out.findings] == ["NORM", "MI", "STTC", "CD", "HYP"]
    predicted = out.extra["predicted_abnormalities"]
    assert [p["code"] for p in predicted] == ["age_over_65", "bmi_over_30", "male_sex"]
    raw = kt_model.predict(prepare_input(ecg, kt_model.manifest)[None])["abnormalities"][0]
    for p, value in zip(predicted, raw):
        assert p["measured"] is False and 0.0 <= p["probability"] <= 1.0
        assert p["probability"] == pytest.approx(float(value), abs=1e-6)
        assert p["present"] == (p["probability"] >= p["threshold"])
        assert set(p) == {
            "code",
            "display",
            "loinc",
            "variable",
            "criterion",
            "probability",
            "threshold",
            "present",
            "measured",
        }
    json.dumps(out.extra)  # stored with the result as JSON


def test_a_head_the_graph_does_not_have_is_a_model_error(tmp_path: Path, ecg: Ecg) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    copy_dir = tmp_path / "kt"
    shutil.copytree(KT_FIXTURE, copy_dir)
    data = manifest_dict()
    data["explanations"][2]["index"] = 7
    (copy_dir / "manifest.json").write_text(json.dumps(data))
    model = ModelRegistry(paths={"kt": copy_dir}).signal_model("kt")
    with pytest.raises(ModelError, match="column 7"):
        model.run(ecg)


def test_a_model_without_explanations_gives_none(ecg: Ecg) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    out = ModelRegistry().signal_model("diagnosis").run(ecg)
    assert "predicted_abnormalities" not in out.extra


def _poor(reason: str = "flat_leads") -> QualityReport:
    return QualityReport(overall="poor", flags=("poor_quality",), leads={}, reasons=(reason,))


def test_a_poor_ecg_carries_no_predictions_and_the_gate_keeps_them() -> None:
    output = kt_output()
    acceptable = QualityReport(overall="acceptable", flags=(), leads={})
    assert cap_for_quality(output, acceptable) is output
    capped = cap_for_quality(output, _poor())
    assert "predicted_abnormalities" not in capped.extra
    assert capped.extra["quality_gate"]["explanations_withheld"] == PREDICTED
    assert cap_for_quality(capped, _poor()) == capped  # idempotent
    assert [f.probability for f in capped.findings] == [f.probability for f in output.findings]
    too_short = cap_for_quality(output, _poor("too_short"))
    assert too_short.extra["quality_gate"]["rule"] == "too_short"
    assert "predicted_abnormalities" not in too_short.extra


# --------------------------------------------------------------------------- the words


def test_the_sentence_every_writer_uses() -> None:
    (first, _) = predicted_abnormalities(kt_output())
    assert (
        sentence(first)
        == "ECG pattern associated with elevated NT-proBNP, p=0.81 (predicted from the ECG, not measured)"
    )


def test_unusable_predictions_are_refused_not_written() -> None:
    bad = [dict(PREDICTED[0], probability=1.4)]
    with pytest.raises(MappingError, match="nt_probnp_high"):
        predicted_abnormalities(kt_output(bad))
    assert predicted_abnormalities(kt_output(bad), strict=False) == []
    with pytest.raises(MappingError, match="measured"):
        predicted_abnormalities(kt_output([dict(PREDICTED[0], measured=True)]))


# --------------------------------------------------------------------------- FHIR


def test_fhir_one_observation_per_prediction_never_coded_as_the_lab() -> None:
    bundle = _report(kt_result())
    predicted = _predicted_observations(bundle)
    assert [o["code"]["coding"][0]["code"] for o in predicted] == ["nt_probnp_high", "hemoglobin_low"]
    nt = predicted[0]
    assert nt["code"]["text"] == "ECG pattern associated with elevated NT-proBNP (predicted from the ECG, not measured)"
    assert nt["method"]["coding"][0] == {
        "system": METHOD_SYSTEM,
        "code": "ecg-model-prediction",
        "display": "Predicted from the ECG by a model",
    }
    assert nt["method"]["text"] == "Predicted from the ECG by model diagnosis-kt version 0.1.0; not a measurement"
    assert nt["valueQuantity"] == {
        "value": 0.81,
        "unit": "probability",
        "system": "http://unitsofmeasure.org",
        "code": "1",
    }
    assert nt["interpretation"][0]["coding"][0]["code"] == "POS"
    assert predicted[1]["interpretation"][0]["coding"][0]["code"] == "NEG"
    assert nt["category"][0]["coding"][0]["code"] == "procedure" and nt["status"] == "preliminary"
    assert nt["meta"]["security"][0]["code"] == "AIAST"
    assert any(LABEL in n["text"] for n in nt["note"])
    assert nt["identifier"][0]["value"] == "urn:oid:1.2.3.4/diagnosis-kt/0.1.0/predicted/nt_probnp_high"
    # the analyte's LOINC is a component *value*, never an Observation or component code
    (variable, criterion) = nt["component"]
    assert variable["valueCodeableConcept"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "33762-6",
        "display": "NT-proBNP",
    }
    assert criterion["valueString"] == "NT-proBNP above 300 pg/mL"
    for obs in (o.resource for o in bundle.observations):
        codes = [c["code"] for c in obs["code"]["coding"]]
        codes += [c["code"] for comp in obs.get("component", []) for c in comp["code"]["coding"]]
        assert not LAB_LOINCS & set(codes), obs["code"]
        assert obs["category"][0]["coding"][0]["code"] == "procedure"


def test_fhir_predictions_are_in_the_report_linked_to_the_findings_and_in_the_conclusion() -> None:
    bundle = _report(kt_result())
    report = bundle.report.resource
    results = [r["reference"] for r in report["result"]]
    findings = [o.placeholder for o in bundle.observations[:5]]
    predicted = [
        o for o in bundle.observations if o.resource["code"]["coding"][0]["system"] == PREDICTED_ABNORMALITY_SYSTEM
    ]
    assert [p.placeholder for p in predicted] == results[-2:]
    for p in predicted:
        assert [d["reference"] for d in p.resource["derivedFrom"]] == findings
        ident = p.resource["identifier"][0]
        assert p.if_none_exist == identifier_query(ident["system"], ident["value"])  # a conditional create
    assert (
        "Predicted from the ECG (not measured), model diagnosis-kt 0.1.0: ECG pattern associated with elevated "
        "NT-proBNP, p=0.81; ECG pattern associated with low hemoglobin, p=0.12." in report["conclusion"].splitlines()
    )
    assert report["conclusion"].splitlines()[-1].endswith("is not a diagnosis.")
    # a provenance names them as targets too
    targets = [t["reference"] for t in bundle.provenance_for("DiagnosticReport/1")["target"]]
    assert set(results) <= set(targets)


def test_fhir_a_revision_amends_the_same_prediction_observations() -> None:
    first, second = _report(kt_result()), _report(kt_result(), version=2)
    ids = [[o.resource["identifier"] for o in _predicted_bundle(b)] for b in (first, second)]
    assert ids[0] == ids[1] and ids[0]
    assert {o.resource["status"] for o in _predicted_bundle(second)} == {"amended"}


def _predicted_bundle(bundle: Any) -> list[Any]:
    return [o for o in bundle.observations if o.resource["code"]["coding"][0]["system"] == PREDICTED_ABNORMALITY_SYSTEM]


def test_fhir_a_poor_ecg_says_the_predictions_were_withheld() -> None:
    capped = cap_for_quality(kt_output(), _poor())
    bundle = _report(AnalysisResult("msg-kt-1", (capped,), quality_flags=("poor_quality",)))
    assert _predicted_observations(bundle) == []
    assert (
        f"{SECTION_TITLE}, model diagnosis-kt 0.1.0: withheld, the ECG's signal quality is poor."
        in bundle.report.resource["conclusion"]
    )


def test_fhir_results_without_predictions_are_unchanged() -> None:
    plain = ModelOutput("diagnosis-kt", "0.1.0", "diagnosis", sample_findings())
    bundle = _report(kt_result(plain))
    assert _predicted_observations(bundle) == []
    assert SECTION_TITLE not in bundle.report.resource["conclusion"]


def test_fhir_a_bad_probability_is_a_permanent_mapping_error() -> None:
    with pytest.raises(MappingError):
        _report(kt_result(kt_output([dict(PREDICTED[0], probability=float("nan"))])))


# --------------------------------------------------------------------------- HL7


class _Destination:
    sending_application = "ECGBRIDGE"
    sending_facility = "HOSP"
    receiving_application = "EHR"
    receiving_facility = "HOSP"
    include_report_pdf = False


def _oru(result: AnalysisResult) -> str:
    ecg = Ecg(
        np.zeros((12, 1000), np.float32),
        STANDARD_LEADS,
        100.0,
        patient=Patient(id="MRN-1"),
        study=Study(acquired_at=datetime(2024, 5, 2, 8, 30, tzinfo=UTC)),
    )
    return build_oru_r01(
        result,
        ecg=ecg,
        order=None,
        destination=_Destination(),
        message_id="msg-kt-1",
        control_id="ctl-1",
        now=datetime(2024, 5, 2, 8, 31, tzinfo=UTC),
    )


def test_hl7_one_nm_obx_per_prediction_with_the_wording_as_nte() -> None:
    import hl7

    er7 = _oru(kt_result())
    validate_er7(er7)
    msg = hl7.parse(er7)
    segments = [str(s).split("|") for s in msg]
    obx = [s for s in segments if s[0] == "OBX" and s[3].split("^")[0].endswith("-predicted")]
    assert [(s[2], s[3], s[5], s[6], s[8]) for s in obx] == [
        (
            "NM",
            "nt_probnp_high-predicted^ECG pattern associated with elevated NT-proBNP (predicted, not measured)^ECGBRIDGE",
            "0.8100",
            "1^^UCUM",
            "POS",
        ),
        (
            "NM",
            "hemoglobin_low-predicted^ECG pattern associated with low hemoglobin (predicted, not measured)^ECGBRIDGE",
            "0.1200",
            "1^^UCUM",
            "NEG",
        ),
    ]
    assert all(s[7] == "" for s in obx)  # no reference range: not a lab value
    assert not any(s[3].split("^")[0] in LAB_LOINCS for s in segments if s[0] == "OBX")
    # the NTEs after the first predicted OBX
    start = segments.index(obx[0])
    notes = [s[3] for s in segments[start + 1 : start + 4]]
    assert notes[0].startswith("Model-generated result") and LABEL in notes[0]
    assert notes[1] == "ECG pattern associated with elevated NT-proBNP, p=0.81 (predicted from the ECG, not measured)"
    assert "not a measurement of NT-proBNP" in notes[2] and "LOINC 33762-6" in notes[2]
    report_notes = [
        s[3] for s in segments[: segments.index(next(s for s in segments if s[0] == "OBX"))] if s[0] == "NTE"
    ]
    assert any(n.startswith(SECTION_TITLE) and "p=0.81" in n for n in report_notes)


def test_hl7_a_poor_ecg_says_the_predictions_were_withheld() -> None:
    capped = cap_for_quality(kt_output(), _poor("too_short"))
    er7 = _oru(AnalysisResult("msg-kt-1", (capped,), quality_flags=("poor_quality", "too_short:2.0s")))
    assert "-predicted^" not in er7
    assert f"{SECTION_TITLE}, model diagnosis-kt 0.1.0: withheld, the recording is too short." in er7


# --------------------------------------------------------------------------- the printout


def _page_text(fig: Any) -> str:
    return "\n".join(t.get_text() for t in [*fig.texts, *fig.axes[0].texts])


def test_the_printout_has_a_predicted_section(ecg: Ecg) -> None:
    pytest.importorskip("matplotlib")
    from ecgbridge.inference.explain import render_figure

    text = _page_text(render_figure(ecg, kt_result()))
    assert f"\n{SECTION_TITLE}:\nECG pattern associated with elevated NT-proBNP p=0.81; low hemoglobin p=0.12." in text
    assert "Normal ECG (NORM)" in text  # the findings are still there
    lots = [dict(PREDICTED[0], code=f"h{i}", display=f"abnormality number {i}") for i in range(12)]
    crowded = _page_text(render_figure(ecg, kt_result(kt_output(lots))))
    assert SECTION_TITLE in crowded and " ..." in crowded
    withheld = _page_text(
        render_figure(
            ecg, AnalysisResult("m", (cap_for_quality(kt_output(), _poor()),), quality_flags=("poor_quality",))
        )
    )
    assert f"{SECTION_TITLE}: withheld (poor quality ECG)." in withheld


def test_result_round_trips_through_the_store_form() -> None:
    result = kt_result()
    back = AnalysisResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert predicted_abnormalities(back.outputs[0]) == predicted_abnormalities(result.outputs[0])


def test_cli_analyse_prints_the_predictions_as_predicted(tmp_path: Path) -> None:
    """``ecgbridge analyse`` (and ``messages show``, same lines) says what the model predicted, as predicted."""
    import subprocess
    import sys

    config = tmp_path / "ecgbridge.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'data'}\n"
        f"models:\n  - {{name: diagnosis-kt-tiny, path: {KT_FIXTURE}}}\n"
        "routes:\n  - {name: all-ecg, models: [diagnosis-kt-tiny], destinations: []}\n",
        encoding="utf-8",
    )
    out = subprocess.run(
        [sys.executable, "-m", "ecgbridge", "analyse", "--config", str(config), str(DICOM_ECG)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    (line,) = [x for x in out.splitlines() if "Predicted from the ECG (not measured)" in x]
    assert "model diagnosis-kt-tiny 0.0.1" in line and "ECG pattern associated with age over 65 years, p=" in line
