"""The knowledge-transfer recipe (training.kt): a CI-sized end-to-end run that checks the pipeline, not the metrics."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the training extra is not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

from tests.support.tiny_ptbxl import write_tiny_ptbxl  # noqa: E402

CODES = ["{'NORM': 100.0}", "{'ASMI': 100.0, 'ISC_': 50.0}", "{'CLBBB': 100.0, '1AVB': 100.0}", "{'LVH': 100.0}"]


def _tiny_ptbxl(root: Path) -> Path:
    """20 records, 4 per fold pair: folds 1-8 train (12), fold 9 (4), fold 10 (4); ages, sexes, some BMIs."""
    rows = []
    rng = np.random.default_rng(0)
    folds = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 9, 9, 9, 9, 10, 10, 10, 10]
    for i, fold in enumerate(folds):
        height: float | str = float(rng.integers(150, 190)) if i % 2 == 0 else ""
        weight: float | str = float(rng.integers(50, 120))
        rows.append((i + 1, 100 + i, float(rng.integers(20, 90)), i % 2, height, weight, CODES[i % 4], fold))
    return write_tiny_ptbxl(root, rows)


#: (record, source fixture, age, sex, #Dx): a challenge-layout folder from the committed PTB-XL records.
CHALLENGE = [
    ("E00001", "00024_lr", "63", "Male", "426783006"),  # sinus rhythm only: NORM
    ("E00002", "00622_lr", "71", "Female", "164865005,164934002"),  # MI + T wave abnormal: MI, STTC
    ("E00003", "00730_lr", "NaN", "Unknown", "164909002,426783006"),  # LBBB: CD
    ("JS00001", "00024_lr", "45", "Female", "426783006"),
    ("JS00002", "00730_lr", "80", "Male", "59118001,426177001"),  # RBBB, sinus bradycardia: CD
    ("JS00003", "00622_lr", "58", "Male", "164934002,67741000119109"),  # STTC, HYP
    ("HR00001", "00024_lr", "50", "Male", "426783006"),  # PTB-XL ecg_id 1: in the tiny PTB-XL, so dropped
]


def _tiny_challenge(root: Path) -> Path:
    """PhysioNet-challenge headers (``# Age``, ``# Sex``, ``# Dx``) over copies of the fixture signals."""
    wfdb = Path(__file__).resolve().parents[1] / "fixtures" / "wfdb"
    root.mkdir(parents=True)
    for name, src, age, sex, dx in CHALLENGE:
        header = (wfdb / f"{src}.hea").read_text().replace(src, name).rstrip("\n")
        (root / f"{name}.hea").write_text(f"{header}\n# Age: {age}\n# Sex: {sex}\n# Dx: {dx}\n# Rx: Unknown\n")
        (root / f"{name}.dat").write_bytes((wfdb / f"{src}.dat").read_bytes())
    return root


def test_kt_runs_end_to_end_and_exports_the_abnormality_heads(tmp_path: Path) -> None:
    import onnxruntime as ort

    from ecgbridge.inference.models import load_manifest
    from ecgbridge.training.kt import train_kt

    data = _tiny_ptbxl(tmp_path / "ptbxl")
    result = train_kt(
        data,
        tmp_path / "out",
        arch="cnn",
        width=8,
        epochs=1,
        pretrain_epochs=1,
        pretrain_batch_size=8,
        batch_size=8,
        compare=True,
        external=_tiny_challenge(tmp_path / "challenge"),
        suite_checks=False,
        n_bootstrap=20,
        log=False,
    )
    model_dir = tmp_path / "out" / "diagnosis-kt"
    manifest = load_manifest(model_dir)
    assert manifest.outputs["abnormalities"] == "abnormalities" and manifest.task == "diagnosis"
    heads = [h["code"] for h in (manifest.architecture or {})["abnormality_heads"]]
    assert heads[:1] == ["age_over_65"] and "male_sex" in heads
    assert [e.code for e in manifest.explanations or []] == heads  # serving's field (docs/kt-encoder.md, Serving)
    assert "explanations" in json.loads((model_dir / "manifest.json").read_text())
    assert result["export"]["parity"]["abnormalities"] <= 1e-4
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(["probabilities", "abnormalities"], {"ecg": np.zeros((3, 12, 1000), np.float32)})
    assert out[0].shape == (3, 5) and out[1].shape == (3, len(heads))
    assert set(result["comparison"]["seed_ensemble_macro_auroc"]) == {
        "shipped",
        "signal-only",
        "knowledge-transfer",
        "multimodal",
    }
    # the external records: every arm scored, pooled and per source; undefined classes named; logits kept
    ext = result["external"]
    assert ext["data"]["dropped_in_ptbxl_data"] == {"HR00001": 1} and ext["data"]["n_records"] == 6
    assert (ext["data"]["with_age"], ext["data"]["with_sex"]) == (5, 5)
    assert set(ext["comparison"]["sources"]) == {"Georgia", "Chapman-Shaoxing/Ningbo"}
    georgia = ext["comparison"]["sources"]["Georgia"]
    assert georgia["left_out_classes"] == {"HYP": "no positives"} and "MI" in georgia["macro_classes"]
    assert "knowledge-transfer - signal-only" in ext["comparison"]["pooled"]["paired_differences"]
    assert "knowledge-transfer - shipped" in ext["comparison"]["pooled"]["paired_differences"]
    saved = np.load(tmp_path / "out" / "external_outputs.npz")
    assert saved["logits_multimodal"].shape == (1, 6, 5) and saved["shipped_probabilities"].shape == (6, 5)
    # the ship rule: decided, written into result.json and the card, never shipped without the suite's checks
    ship = result["ship"]
    assert ship["ships"] is False and ship["text"].startswith("ships: no, because")
    assert "noise and CAM checks were not run" in ship["text"]
    assert set(ship["external"]["sources"]) == {"Georgia", "Chapman-Shaoxing/Ningbo"}
    assert ship["sanity"]["input_dependence"]["passed"] in (True, False)
    card = (model_dir / "MODEL_CARD.md").read_text()
    assert "## Ship decision" in card and ship["text"] in card and "External: Georgia" in card
    assert (tmp_path / "out" / "clinical_manifest.jsonl").is_file()
    assert "Three-way comparison" in (model_dir / "MODEL_CARD.md").read_text()
    assert json.loads((tmp_path / "out" / "result.json").read_text())["stage1"][0]["with_clinical"] == 12
    # single-seed runs pool into one comparison
    from ecgbridge.training.kt import main

    assert (
        main(
            [
                "combine",
                str(tmp_path / "out"),
                str(tmp_path / "out"),
                "--out",
                str(tmp_path / "cmp"),
                "--n-bootstrap",
                "10",
            ]
        )
        == 0
    )
    pooled = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert pooled["n_seeds"] == {"shipped": 1, "signal-only": 2, "knowledge-transfer": 2, "multimodal": 2}
    assert pooled["external"]["comparison"]["pooled"]["n_seeds"]["knowledge-transfer"] == 2
    assert [d["ships"] for d in pooled["ship_decisions"]] == [False, False]
    assert "Ship decisions of the runs" in (tmp_path / "cmp" / "COMPARISON.md").read_text()


def test_clip_loss_is_low_for_matching_pairs() -> None:
    from ecgbridge.training.kt import clip_loss

    a = torch.eye(4)
    assert float(clip_loss(a, a, 0.1)) < 0.01 < float(clip_loss(a, a.roll(1, 0), 0.1))


def test_cli_knows_train_kt() -> None:
    from ecgbridge.cli import TRAINING_ENTRIES

    assert TRAINING_ENTRIES["kt"] == ("ecgbridge.training.kt", "ecgbridge.training.evaluate")


def test_kt_graph_exports_abnormalities_with_parity(tmp_path: Path) -> None:
    from ecgbridge.training.export import check_parity, export_model, parity_by_output
    from ecgbridge.training.kt import KtServingGraph, embed
    from ecgbridge.training.models import Cnn1d

    torch.manual_seed(0)
    members = [Cnn1d(width=8), Cnn1d(width=8)]
    for m in members:
        m.train()
        with torch.no_grad():  # non-trivial BatchNorm statistics
            m(torch.randn(8, 12, 1000))
        m.eval()
    heads = [torch.nn.Linear(32, 3), torch.nn.Linear(32, 3)]
    graph = KtServingGraph(members, heads, temperature=[1.5] * 5, offset=[0.1] * 5).eval()
    x = torch.randn(4, 12, 1000)
    with torch.no_grad():
        probabilities, _cams, _logits, abnormalities = graph(x)
        expected = torch.stack([torch.sigmoid(h(embed(m, x))) for m, h in zip(members, heads)]).mean(0)
    assert torch.allclose(abnormalities, expected, atol=1e-6) and probabilities.shape == (4, 5)
    result = export_model(
        graph,
        tmp_path / "m",
        classes=("NORM", "MI", "STTC", "CD", "HYP"),
        thresholds=dict.fromkeys(("NORM", "MI", "STTC", "CD", "HYP"), 0.5),
        name="kt-test",
        version="0.0.1",
    )
    assert result["manifest"]["outputs"]["abnormalities"] == "abnormalities"
    assert check_parity(graph, tmp_path / "m" / "model.onnx") <= 1e-4
    assert parity_by_output(graph, tmp_path / "m" / "model.onnx")["abnormalities"] <= 1e-4


def test_compare_arms_pairs_every_arm_present() -> None:
    from ecgbridge.training.kt import compare_arms

    rng = np.random.default_rng(0)
    y = (rng.random((40, 5)) < 0.4).astype(np.float32)
    good = [y + rng.normal(0, 0.5, y.shape) for _ in range(2)]
    noise = [rng.normal(0, 1, y.shape) for _ in range(2)]
    out = compare_arms(
        y, np.arange(40), {"signal-only": noise, "ssl-only": noise, "knowledge-transfer": good}, n_bootstrap=50
    )
    assert list(out["paired_differences"]) == [
        "ssl-only - signal-only",
        "knowledge-transfer - signal-only",
        "knowledge-transfer - ssl-only",
    ]
    assert out["paired_differences"]["knowledge-transfer - signal-only"]["ci"][0] > 0
    assert out["paired_differences"]["ssl-only - signal-only"]["diff"] == 0


# ----- the ship rule ---------------------------------------------------------------------------------------
def _cmp(kt: float, shipped: float) -> dict[str, object]:
    return {"candidate": kt, "live": shipped, "difference": kt - shipped, "difference_ci": [kt - shipped - 0.05, 0.1]}


def test_the_ship_rule_needs_fold_10_the_external_records_and_every_check() -> None:
    from ecgbridge.training.kt import decide_ship

    sane = {"passed": True}
    suite = {"ran": True, "checks": {"noise": {"required": True, "outcome": "passed"}}}
    assert decide_ship(_cmp(0.91, 0.90), _cmp(0.75, 0.75), sane, suite)["ships"] is True  # a tie is at least as good
    no = decide_ship(_cmp(0.89, 0.90), _cmp(0.80, 0.75), sane, suite)
    assert not no["ships"] and no["text"].startswith("ships: no, because KT 0.890 < shipped 0.900 on PTB-XL fold 10")
    assert not decide_ship(_cmp(0.91, 0.90), None, sane, suite)["ships"]  # external records not evaluated
    assert not decide_ship(_cmp(0.91, 0.90), _cmp(0.74, 0.75), sane, suite)["ships"]
    assert not decide_ship(_cmp(0.91, 0.90), _cmp(0.76, 0.75), {"passed": False}, suite)["ships"]
    failed = {"ran": True, "checks": {"noise": {"required": True, "outcome": "failed"}}}
    assert "the suite's noise check: failed" in decide_ship(_cmp(0.91, 0.9), _cmp(0.76, 0.75), sane, failed)["text"]
    reported = {"ran": True, "checks": {"mi_cam_qrs_st": {"required": False, "outcome": "failed"}}}
    assert decide_ship(_cmp(0.91, 0.9), _cmp(0.76, 0.75), sane, reported)["ships"] is True


def test_the_suite_checks_run_the_test_suite_on_a_model_directory() -> None:
    """The shipped model through the same tests: it passes the noise and randomisation tests, xfails the MI map."""
    from ecgbridge.inference.models import SHIPPED_DIR
    from ecgbridge.training.kt import run_suite_checks

    suite = run_suite_checks(SHIPPED_DIR / "diagnosis-baseline")
    assert suite["ran"] and suite["passed"], suite
    outcomes = {k: v["outcome"] for k, v in suite["checks"].items()}
    assert outcomes == {"noise": "passed", "cam_randomisation": "passed", "mi_cam_qrs_st": "xfailed"}


# ----- --from-store: the manifest from the EHR context stored with each analysed ECG -------------------------
def _context(i: int, when: datetime) -> dict[str, Any]:
    """Patient ``i``'s EHR context at ``when``, made by ``mapping.ehr_context`` from FHIR resources."""
    from ecgbridge.mapping.ehr_context import context_from_resources
    from tests.support.ehr_bundles import observation

    at = (when - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    subject = f"Patient/p{i}"
    observations = [
        observation(subject, "33762-6", 100.0 + 250.0 * (i % 4), "pg/mL", at),  # NT-proBNP: > 300 for i % 4 >= 1
        observation(subject, "14682-9", 70.0 + 30.0 * (i % 3), "umol/L", at),  # creatinine in umol/L
        observation(subject, "2823-3", 3.2 + 0.5 * (i % 4), "mmol/L", at),  # potassium: 3.2 is low
        observation(subject, "718-7", 110.0 + 15.0 * (i % 3), "g/L", at),  # hemoglobin in g/L
        observation(subject, "67151-1", 5.0 + 10.0 * (i % 3), "ng/L", at),  # hs troponin T
        observation(subject, "8480-6", 115.0 + 5.0 * (i % 7), "mm[Hg]", at),
        observation(subject, "8867-4", 72.0, "/min", at),  # heart rate: kept, not used
    ]
    patient = {"resourceType": "Patient", "id": f"p{i}", "gender": "male" if i % 2 else "female"}
    patient["birthDate"] = "1921-02-03" if i == 0 else f"{1945 + i}-05-01"
    ctx = context_from_resources(patient, observations, None, None, acquired_at=when, window_days=30, source="ehr-test")
    return ctx.to_dict()


def _save_context(store: Any, message_id: str, context: dict[str, Any] | None) -> None:
    """The result the worker stores when the LVEF model ran: its output carries ``extra["ehr_context"]``."""
    from ecgbridge.mapping.ecg import AnalysisResult, ModelOutput

    extra = {"ehr_context": context} if context is not None else {}
    result = AnalysisResult(message_id, (ModelOutput("lvef", "0.0.1", "lvef", (), extra=extra),))
    assert store.save_result(message_id, result.to_dict(), "lvef@0.0.1")


def _context_store(store: Any) -> dict[str, Any]:
    """#13's over-read site store (41 ECGs) + EHR context for 40, 6 ECGs without a read, 1 with neither."""
    from ecgbridge.mapping.ecg import Patient
    from ecgbridge.mapping.readers import read_ecg_file
    from tests.support.site_store import FIXTURES, KINDS, build_site_store, record_ecg

    made = build_site_store(store, n_patients=20, ecgs_per_patient=2, spacing_days=3)
    for e in made:
        if e.patient_id is not None:  # the ECG naming no patient keeps no result: over-read, never analysed
            _save_context(store, e.message_id, _context(int(e.patient_id[2:6]) - 7000, e.acquired_at))
    unread = []
    for k in range(6):  # ECGs nobody over-read: clinical data only (stages 1 and 3)
        when = datetime(2026, 1, 6 + k, 8, tzinfo=UTC)
        ecg = read_ecg_file(FIXTURES / KINDS[("norm", "mi", "cd")[k % 3]][0])
        patient = Patient(id=f"ZQ{8000 + k}MRN", id_issuer="HOSP", name=f"Unread^Patient{k}", sex="male")
        uid = f"1.2.826.0.1.3680043.10.1234.8{k}"
        mid = record_ecg(store, ecg, patient=patient, acquired_at=when, sop_instance_uid=uid)
        _save_context(store, mid, _context(30 + k, when))
        unread.append(mid)
    bare = record_ecg(
        store,
        read_ecg_file(FIXTURES / KINDS["norm"][0]),
        patient=Patient(id="ZQ9999MRN", id_issuer="HOSP"),
        acquired_at=datetime(2026, 1, 7, tzinfo=UTC),
        sop_instance_uid="1.2.826.0.1.3680043.10.1234.99",
    )
    _save_context(store, bare, None)  # analysed without an EHR context and never read: not in the manifest
    return {"made": made, "unread": unread, "bare": bare}


@pytest.fixture(scope="module")
def context_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from ecgbridge.core.store import MessageStore
    from tests.support.site_store import site_config

    folder = tmp_path_factory.mktemp("kt-site")
    store = MessageStore(f"sqlite:///{folder / 'ecgbridge.db'}", folder)
    store.create_schema()
    made = _context_store(store)
    store.engine.dispose()
    return site_config(folder), made


def _check_store_manifest(manifest: Any, made: dict[str, Any]) -> None:
    from ecgbridge.training.clinical import read_manifest

    rows = {r.ecg_id: r for r in manifest.rows}
    report = json.loads((manifest.ecg_root / "report.json").read_text())
    assert made["bare"] not in rows and report["left_out"]["neither EHR context data nor a label"] == 1
    assert report["rows"] == len(rows) and report["labelled"] + len(made["unread"]) == len(rows)
    (anonymous,) = [e for e in made["made"] if e.patient_id is None]
    assert not rows[anonymous.message_id].variables and rows[anonymous.message_id].labels  # a read, no context
    assert rows[anonymous.message_id].patient_id == f"ecg:{anonymous.message_id}"
    for mid in made["unread"]:
        assert mid not in rows or rows[mid].labels is None
    one = [e for e in made["made"] if e.patient_id == "ZQ7001MRN" and e.message_id in rows]  # NT-proBNP 350, ...
    assert one, "patient 1's ECGs are in the manifest"
    for e in one:
        row = rows[e.message_id]
        by = {m.loinc: m for m in row.variables}
        assert by["30525-0"].value == pytest.approx(2026 - 1946 - 1, abs=1) and by["46098-0"].value == 1.0
        assert by["2160-0"].value == pytest.approx(100 / 88.42, rel=1e-3) and by["2160-0"].unit == "mg/dL"
        assert by["718-7"].value == pytest.approx(12.5) and by["33762-6"].value == pytest.approx(350.0)
        assert by["6598-7"].value == pytest.approx(0.015) and by["6598-7"].unit == "ng/mL"  # hs-TnT 15 ng/L
        assert by["8867-4"].value == 72.0 and by["8867-4"].unit == "/min"  # heart rate: kept as written, not used
        assert by["2823-3"].time is not None and by["2823-3"].time < row.ecg_time
        assert row.labels == {c: 0.5 if c in e.uncertain else float(v) for c, v in e.labels.items()}  # hedged: 0.5
    assert any(0.5 in (r.labels or {}).values() for r in manifest.rows), "a hedged statement is 0.5"
    oldest = [r for r in manifest.rows if any(m.loinc == "30525-0" and m.value == 90.0 for m in r.variables)]
    assert oldest, "patient 0 (born 1921) is over 90: capped"
    assert {r.split for r in manifest.rows} <= {"1", "9", "10"}
    patients: dict[str, set[str | None]] = {}
    for r in manifest.rows:
        patients.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in patients.values())
    text = (manifest.ecg_root / "clinical_manifest.jsonl").read_text()
    for e in made["made"]:
        assert e.patient_id is None or e.patient_id not in text
        assert e.patient_name is None or e.patient_name not in text
    again = read_manifest(manifest.ecg_root / "clinical_manifest.jsonl")
    assert len(again.rows) == len(manifest.rows) and not again.report["missing_ecg"]


def test_kt_from_store_trains_on_the_stored_ehr_context_and_over_reads(
    context_site: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """``ecgbridge train kt --from-store``: manifest from the store, stages 1-3 on it, lab heads, export, rule."""
    from ecgbridge.cli import main
    from ecgbridge.inference.models import load_manifest
    from ecgbridge.training.clinical import read_manifest

    config, made = context_site
    out = tmp_path / "kt-site"
    argv = ["train", "kt", "--from-store", "--config", str(config), "--out", str(out), "--arch", "cnn"]
    argv += ["--width", "8", "--epochs", "1", "--pretrain-epochs", "1", "--batch-size", "8", "--compare"]
    assert main([*argv, "--n-bootstrap", "20", "--no-suite-checks", "--threads", "1"]) == 0
    manifest = read_manifest(out / "store-manifest" / "clinical_manifest.jsonl")
    _check_store_manifest(manifest, made)
    result = json.loads((out / "result.json").read_text())
    assert result["data"]["source"].startswith("clinical manifest") and result["data"]["train_without_label"] >= 1
    heads = {h["code"] for h in result["abnormality_heads"]}
    assert {"nt_probnp_high", "troponin_t_high", "creatinine_high", "hemoglobin_low", "potassium_abnormal"} <= heads
    assert "systolic_bp" in result["data"]["clinical_variables"].values()
    assert result["ship"]["test_label"] == "the held-out split (10)" and result["ship"]["ships"] is False
    model = load_manifest(out / "diagnosis-kt")
    assert model.task == "diagnosis" and "clinical manifest" in (model.trained_on or "")


def test_store_manifest_on_postgresql(tmp_path: Path) -> None:
    from ecgbridge.training.from_store import clinical_manifest_from_store
    from tests.support.peers import need
    from tests.support.stores import PostgresUnavailable, message_store

    try:
        with message_store("postgresql", tmp_path, "ktstore") as store:
            made = _context_store(store)
            manifest = clinical_manifest_from_store(store, tmp_path / "manifest", log=lambda _: None)
    except PostgresUnavailable as exc:
        need(f"PostgreSQL run skipped: {exc}")
    _check_store_manifest(manifest, made)
    assert manifest.report["labelled"] >= 20 and manifest.report["with_clinical_data"] == len(manifest.rows) - 1


def test_store_manifest_refuses_an_unknown_unit_by_name(tmp_path: Path) -> None:
    from ecgbridge.core.store import MessageStore
    from ecgbridge.mapping.ecg import Patient
    from ecgbridge.mapping.readers import read_ecg_file
    from ecgbridge.training.clinical import ClinicalDataError
    from ecgbridge.training.from_store import clinical_manifest_from_store
    from tests.support.site_store import FIXTURES, KINDS, record_ecg

    store = MessageStore(f"sqlite:///{tmp_path / 'ecgbridge.db'}", tmp_path)
    store.create_schema()
    when = datetime(2026, 2, 1, 9, tzinfo=UTC)
    ecg = read_ecg_file(FIXTURES / KINDS["norm"][0])
    mid = record_ecg(store, ecg, patient=Patient(id="ZQ1MRN"), acquired_at=when, sop_instance_uid="1.2.3.4.5")
    context = _context(3, when)
    context["values"]["creatinine"]["unit"] = "furlongs"  # a stored context no table converts
    _save_context(store, mid, context)
    with pytest.raises(
        ClinicalDataError, match=rf"message {mid}: creatinine \(LOINC 2160-0\): unknown unit 'furlongs'"
    ):
        clinical_manifest_from_store(store, tmp_path / "manifest", log=lambda _: None)
    store.engine.dispose()
