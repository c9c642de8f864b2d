"""A site's store with over-read ECGs, built from the committed real fixtures (test support).

Local retraining and the de-identified export read the ECGs cardiologists confirmed; their tests
need a store that holds some. :func:`build_site_store` records DICOM ECGs made from the three
real PTB-XL fixtures (NORM 00024, MI 00622, CD 00730), each copy with its own synthetic patient,
time and small jitter (amplitude, noise, a circular time shift: the copies are not identical
inputs), and a confirmed read of each as a MUSE-style HL7 ORU without waveform, recorded
through :func:`ecgbridge.core.labels.record_overread` as the HL7 listener records them. The
reads state the fixture's own PTB-XL statements as SCP-ECG codes, so every label is the
record's published one; one read per patient adds a hedged ("POSSIBLE ...") statement, an
uncertain class.

:class:`SiteEcg` keeps what was written (the identifiers included), so tests can check that an
export does not contain them. Every identifier is synthetic.

:func:`build_from_challenge` (``python -m tests.support.site_store --challenge DIR --data-dir DIR``)
makes the demonstration store of docs/site-learning.md from the PhysioNet/CinC 2021 records in
``../shared/data`` instead: the Georgia and Chapman-Shaoxing/Ningbo records, which no shipped model
was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

from ecgbridge.core import labels
from ecgbridge.core.store import MessageStore
from ecgbridge.mapping.ecg import Ecg, Patient, Study
from ecgbridge.mapping.overread_readers import read_oru
from ecgbridge.mapping.readers import read_ecg_file
from tests.support.dicom_writer import dataset_to_bytes, ecg_to_dataset
from tests.support.overreads import overread_oru

__all__ = [
    "SiteEcg",
    "KINDS",
    "build_site_store",
    "build_from_challenge",
    "record_ecg",
    "record_read",
    "site_config",
    "main",
]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

#: kind -> (fixture, SCP-ECG statements of its PTB-XL record, the label they give)
KINDS: dict[str, tuple[str, list[tuple[str, str, str]], dict[str, int]]] = {
    "norm": (
        "dicom/ptbxl_00024_norm_12lead.dcm",
        [("NORM", "normal ECG", "SCPECG"), ("SR", "sinus rhythm", "SCPECG")],
        {"NORM": 1, "MI": 0, "STTC": 0, "CD": 0, "HYP": 0},
    ),
    "mi": (
        "dicom/ptbxl_00622_mi_12lead.dcm",
        [("ASMI", "anteroseptal myocardial infarction", "SCPECG"), ("ISC_", "non-specific ischemic", "SCPECG")],
        {"NORM": 0, "MI": 1, "STTC": 1, "CD": 0, "HYP": 0},
    ),
    "cd": (
        "dicom/ptbxl_00730_cd_12lead.dcm",
        [("CLBBB", "complete left bundle branch block", "SCPECG"), ("1AVB", "first degree AV block", "SCPECG")],
        {"NORM": 0, "MI": 0, "STTC": 0, "CD": 1, "HYP": 0},
    ),
}
HEDGED = "POSSIBLE LEFT VENTRICULAR HYPERTROPHY"


@dataclass(frozen=True)
class SiteEcg:
    """One ECG recorded in the test store, and the truth about it (identifiers included)."""

    message_id: str
    sop_instance_uid: str
    kind: str
    patient_id: str | None
    patient_name: str | None
    birth_date: str | None
    acquired_at: datetime
    read_at: datetime
    labels: dict[str, int]
    uncertain: tuple[str, ...]


def record_ecg(store: MessageStore, ecg: Ecg, *, patient: Patient, acquired_at: datetime, sop_instance_uid: str) -> str:
    """Store ``ecg`` as a DICOM ECG from a cart, as the DICOM listener records one; its message id."""
    ds = ecg_to_dataset(ecg, patient=patient, study=Study(sop_instance_uid=sop_instance_uid, acquired_at=acquired_at))
    data = dataset_to_bytes(ds)
    sha, size = store.save_blob(data)
    return store.record_message(
        source="dicom",
        remote="CART1@127.0.0.1",
        blob_sha256=sha,
        blob_size=size,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=sop_instance_uid,
        route="all-ecg",
        state="analysed",
        acquired_at=acquired_at,
    )


def record_read(
    store: MessageStore,
    sop_instance_uid: str,
    statements: list[str | tuple[str, str, str]],
    *,
    control: str,
    patient_id: str,
    acquired_at: datetime,
    read_at: datetime,
    reader: str = "4711&Heart&Anna",
) -> str:
    """A confirmed (F) read of that ECG, as an ORU without waveform from MUSE; the carrier's message id."""
    oru = overread_oru(
        control,
        statements,
        patient_id=patient_id,
        acquired_at=acquired_at,
        read_at=read_at,
        reader=reader,
        sop_instance_uid=sop_instance_uid,
    ).encode()
    sha, size = store.save_blob(oru)
    carrier = store.record_message(
        source="hl7", blob_sha256=sha, blob_size=size, state="processed", flags=["overread"], message_type="ORU^R01"
    )
    labels.record_overread(store, read_oru(oru), message_id=carrier, source="hl7", sender="MUSE", window_min=10)
    return carrier


def _jitter(ecg: Ecg, rng: np.random.Generator) -> Ecg:
    x = ecg.signals.astype(np.float64)
    x = np.roll(x * rng.uniform(0.85, 1.15), int(rng.integers(0, x.shape[1])), axis=1)
    x = x + rng.normal(0.0, 0.03 * float(np.std(x)), size=x.shape)
    return replace(ecg, signals=x.astype(np.float32))


def build_site_store(
    store: MessageStore,
    *,
    n_patients: int = 12,
    ecgs_per_patient: int = 3,
    start: datetime = datetime(2026, 1, 5, 9, 30, tzinfo=UTC),
    spacing_days: int = 20,
    anonymous: int = 1,
    seed: int = 0,
) -> list[SiteEcg]:
    """Record ``n_patients`` x ``ecgs_per_patient`` labelled ECGs (+ ``anonymous`` without a patient id).

    Patient ``i``'s ECG ``j`` is recorded ``2 i + spacing_days * j`` days after ``start``, so the
    patients' ECGs interleave in time and most patients have ECGs on both sides of any cut-off;
    its kind cycles NORM, MI, CD. Patient 0 was born in 1921 (older than 90 at every ECG).
    """
    rng = np.random.default_rng(seed)
    sources = {kind: read_ecg_file(FIXTURES / path) for kind, (path, _, _) in KINDS.items()}
    made: list[SiteEcg] = []
    plan: list[tuple[int, int]] = [(i, j) for i in range(n_patients) for j in range(ecgs_per_patient)]
    plan += [(-1 - a, 0) for a in range(anonymous)]
    for i, j in plan:
        anonymous_ecg = i < 0
        kind = list(KINDS)[(abs(i) + j) % len(KINDS)]
        _path, statements, truth = KINDS[kind]
        pid = None if anonymous_ecg else f"ZQ{7000 + i:04d}MRN"
        name = None if anonymous_ecg else f"Testpatient^Quintessa{i:02d}"
        born = None if anonymous_ecg else ("1921-02-03" if i == 0 else f"{1950 + i}-0{1 + i % 9}-1{i % 10}")
        when = start + timedelta(days=(2 * abs(i) + spacing_days * j), hours=int(rng.integers(0, 8)))
        uid = f"1.2.826.0.1.3680043.10.1234.{7000 + abs(i)}.{j}.{int(anonymous_ecg)}"
        patient = Patient(id=pid, id_issuer="HOSP" if pid else None, name=name, birth_date=born, sex="female")
        mid = record_ecg(store, _jitter(sources[kind], rng), patient=patient, acquired_at=when, sop_instance_uid=uid)
        said: list[str | tuple[str, str, str]] = list(statements)
        uncertain: tuple[str, ...] = ()
        if j == 1:
            said.append(HEDGED)
            uncertain = ("HYP",)
        read_at = when + timedelta(hours=3)
        record_read(
            store,
            uid,
            said,
            control=f"R{abs(i)}-{j}-{int(anonymous_ecg)}",
            patient_id=pid or "",
            acquired_at=when,
            read_at=read_at,
        )
        made.append(SiteEcg(mid, uid, kind, pid, name, born, when, read_at, dict(truth), uncertain))
    return made


def site_config(folder: Path, database_url: str | None = None) -> Path:
    """A configuration file naming the store in ``folder`` (``data_dir``) or at ``database_url``."""
    config = folder / "site.yaml"
    storage = f"storage: {{database_url: '{database_url}'}}\n" if database_url else ""
    config.write_text(f"data_dir: {folder}\n{storage}")
    return config


def build_from_challenge(
    store: MessageStore, data_dir: Path, *, start: datetime = datetime(2026, 1, 5, 9, 30, tzinfo=UTC)
) -> list[SiteEcg]:
    """The challenge's Georgia (E) and Chapman (JS) records as a site's over-read ECGs (demonstration only).

    Each record is a patient of its own (the challenge gives no patient identifier): a synthetic
    identifier, a birth date on 1 January making the header's age right, one ECG a day alternating
    the two sources. The read states the header's ``#Dx`` SNOMED CT codes; a record the challenge
    evaluation calls NORM (sinus rhythm and nothing abnormal, ``training.datasets.challenge``) also
    gets "NORMAL ECG" (SNOMED CT 164854000), the statement a cardiologist would sign.
    """
    from ecgbridge.training.datasets.challenge import read_header, superclasses_from_snomed

    georgia = sorted(data_dir.glob("E[0-9]*.hea"))
    chapman = sorted(data_dir.glob("JS[0-9]*.hea"))
    order = [p for pair in zip(georgia, chapman) for p in pair] + georgia[len(chapman) :] + chapman[len(georgia) :]
    made: list[SiteEcg] = []
    for k, path in enumerate(order):
        header = read_header(path)
        ecg = read_ecg_file(path)
        when = start + timedelta(days=k)
        pid = f"DEMO{k:04d}"
        born = f"{when.year - int(header.age)}-01-01" if header.age is not None else None
        sex = {"male": "male", "female": "female"}.get(header.sex or "")
        uid = f"1.2.826.0.1.3680043.10.1234.9.{k}"
        patient = Patient(id=pid, id_issuer="DEMO", name=f"Demo^Patient{k:04d}", birth_date=born, sex=sex)
        mid = record_ecg(store, ecg, patient=patient, acquired_at=when, sop_instance_uid=uid)
        said: list[str | tuple[str, str, str]] = [(code, "", "SCT") for code in header.dx]
        if superclasses_from_snomed(header.dx) == {"NORM"} and "164854000" not in header.dx:
            said.append(("164854000", "Normal ECG", "SCT"))
        read_at = when + timedelta(hours=5)
        record_read(store, uid, said, control=f"DEMO{k}", patient_id=pid, acquired_at=when, read_at=read_at)
        made.append(SiteEcg(mid, uid, path.stem, pid, patient.name, born, when, read_at, {}, ()))
    return made


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.support.site_store", description=__doc__.split("\n")[0])
    parser.add_argument("--challenge", type=Path, help="the CinC 2021 folder (else: the committed fixtures)")
    parser.add_argument("--data-dir", type=Path, required=True, help="a new folder for the store and site.yaml")
    args = parser.parse_args(argv)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    store = MessageStore(f"sqlite:///{args.data_dir / 'ecgbridge.db'}", args.data_dir)
    store.create_schema()
    made = build_from_challenge(store, args.challenge) if args.challenge else build_site_store(store)
    print(f"{len(made)} over-read ECGs recorded; configuration: {site_config(args.data_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
