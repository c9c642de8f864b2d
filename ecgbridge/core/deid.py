"""A de-identified copy of the site's training set, for research: ``ecgbridge export training-set``.

The labels and the training set stay in the site's store (:mod:`ecgbridge.core.training_set`
reads them); this writes a copy that names no patient, for a research partner or a shared
benchmark. What :func:`export_training_set` applies, each step a function here:

- **Identifiers hashed with a site secret.** ECG, patient and reader identifiers become
  ``HMAC-SHA256(secret, kind + "|" + value)``, hex, truncated (:class:`Deidentifier`): ``E`` + 20
  hex digits for an ECG (from its message id), ``P`` + 20 for a patient (from the issuer and
  identifier the ECG carries), ``R`` + 12 for the cardiologist who read it. Without the secret
  nobody can recompute them; with it anyone can test a guessed identifier, so the secret is kept
  like a password: it comes from an environment variable (:func:`secret_from_env`, at least
  :data:`MIN_SECRET_CHARS` characters), never from the command line or a file we write, and
  an export without one is refused. The same secret gives the same pseudonyms in every export
  (exports can be joined); a new secret gives unlinkable ones.
- **Dates shifted per patient.** Every date and time of a patient (acquisition, read) moves by
  the same whole number of days, derived from the secret and the patient
  (:meth:`Deidentifier.shift_days`: -365..-1 or +1..+365, never 0), so intervals between a
  patient's ECGs and reads are kept exactly and the time of day too. Note: HIPAA's Safe Harbor
  method removes all dates but the year; shifted dates are a *limited data set* or need an
  expert determination. The README the export writes says so.
- **No names, no birth dates.** The patient's name, identifier, birth date, the ECG's UIDs,
  accession and order numbers, the device and the free text of the read are not written. Age
  is given in whole years at the ECG's (true) date, **capped at 90** (:data:`AGE_CAP`: "90"
  means 90 or older, as Safe Harbor aggregates ages over 89); sex is kept.
- **Waveforms in a standard format**: WFDB (``records/E....hea`` + ``.dat``, format 16, the
  lead names and units of the ECG, no header comments and no base date) through the ``wfdb``
  library, or NumPy (``records/E....npz``: ``signals`` float32 (leads, samples), ``leads``
  (str), ``fs`` (float, Hz), ``units`` (str)).
- ``labels.csv`` (one row per ECG, the columns in :data:`COLUMNS`, ordered by patient pseudonym then
  shifted time: the true order of ECGs across patients is not kept), ``manifest.json`` (counts,
  format, the de-identification applied, the columns) and ``README.md`` (the same, for people).
  The selection window and the command line are *not* recorded: real dates next to shifted ones
  would narrow the shifts.

Nothing is logged but counts.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from ecgbridge.core.store import MessageStore
from ecgbridge.core.training_set import SiteRecord, iter_site_records
from ecgbridge.errors import ConfigError, EcgBridgeError

__all__ = [
    "SECRET_ENV",
    "MIN_SECRET_CHARS",
    "MAX_SHIFT_DAYS",
    "AGE_CAP",
    "FORMATS",
    "CLASSES",
    "COLUMNS",
    "Deidentifier",
    "ExportReport",
    "secret_from_env",
    "age_years",
    "export_training_set",
]

log = logging.getLogger("ecgbridge.deid")

#: The environment variable the site secret is read from unless ``--secret-env`` names another.
SECRET_ENV = "ECGBRIDGE_DEID_SECRET"
#: A shorter secret could be guessed, and with it every pseudonym tested against guessed identifiers.
MIN_SECRET_CHARS = 16
MAX_SHIFT_DAYS = 365
#: Ages above 89 are written as 90 (HIPAA Safe Harbor, 45 CFR 164.514(b)(2)(i)(C)).
AGE_CAP = 90
FORMATS = ("wfdb", "npz")
#: WFDB samples per signal unit (1 uV steps for mV) unless the ECG's range needs another gain.
WFDB_GAIN = 1000.0
#: The diagnosis classes an over-read labels, in the models' order.
CLASSES = ("NORM", "MI", "STTC", "CD", "HYP")

#: labels.csv, in column order: name -> what it holds.
COLUMNS: dict[str, str] = {
    "ecg": "the ECG's pseudonym: E + HMAC-SHA256(secret, 'ecg|' + store message id), 20 hex digits",
    "patient": "the patient's pseudonym: P + HMAC-SHA256(secret, 'patient|' + keyed patient hash), 20 hex digits; "
    "an ECG that names no patient gets its own (patient_known 0)",
    "patient_known": "1 when the ECG named a patient identifier, 0 when it did not (then it is its own patient)",
    "record": "the waveform file, relative to this folder, without extension (WFDB record name / .npz file)",
    "acquired_at": "when the ECG was recorded, shifted by the patient's offset (ISO 8601, UTC)",
    "time_source": "acquired: the ECG's acquisition time; received: it had none, the time ecgbridge received it",
    "read_at": "when the over-read was made, shifted by the same offset (empty when the read gives no time)",
    "age_years": f"age in whole years at the ECG's date, {AGE_CAP} meaning {AGE_CAP} or older; empty when unknown",
    "sex": "male | female | other | unknown, as the ECG gives it; empty when not given",
    "fs_hz": "sampling rate of the waveform (Hz)",
    "n_samples": "samples per lead",
    "leads": "lead names in the order of the waveform's signals, space-separated",
    "units": "signal units as the ECG gave them (mV for a calibrated ECG)",
    **{c: f"1: the cardiologist confirmed {c}; 0: not stated; empty: the read names no diagnosis" for c in CLASSES},
    "uncertain": "classes the read names only with a hedge ('possible ...'), space-separated: their 0 is not an 'absent'",
    "severity4": "the read's triage tier: normal | minor_abnormality | major_nonurgent | urgent (empty: not tiered)",
    "severity3": "normal | abnormal_nonurgent | urgent (empty: not tiered)",
    "complete": "1 when every statement of the read was understood, 0 when some were not (their classes may be missing)",
    "read_status": "F (final) or C (corrected): the read that is the ECG's label now",
    "reader": "the reading cardiologist's pseudonym: R + HMAC-SHA256(secret, 'reader|' + name), 12 hex digits",
}


def secret_from_env(var: str = SECRET_ENV, environ: Mapping[str, str] | None = None) -> bytes:
    """The site secret from environment variable ``var``; ConfigError when unset or too short."""
    value = (os.environ if environ is None else environ).get(var, "")
    if not value:
        raise ConfigError(
            f"no de-identification secret: set the environment variable {var} to a secret of at least "
            f"{MIN_SECRET_CHARS} characters (e.g. export {var}=$(openssl rand -hex 32)) and keep it like a "
            "password; the export is refused without one"
        )
    if len(value) < MIN_SECRET_CHARS:
        raise ConfigError(
            f"the de-identification secret in {var} has {len(value)} characters: at least {MIN_SECRET_CHARS} are "
            "needed (a short one can be guessed, and with it every pseudonym tested against guessed identifiers)"
        )
    return value.encode()


class Deidentifier:
    """Pseudonyms and date shifts from one site secret (see the module docstring)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_CHARS:
            raise ValueError(f"the secret must have at least {MIN_SECRET_CHARS} bytes")
        self._secret = secret

    def _mac(self, kind: str, value: str) -> str:
        return hmac.new(self._secret, f"{kind}|{value}".encode(), hashlib.sha256).hexdigest()

    def ecg(self, message_id: str) -> str:
        return "E" + self._mac("ecg", message_id)[:20]

    def patient(self, patient_key: str | None, message_id: str) -> str:
        """A patient's pseudonym; an ECG that names no patient is a patient of its own."""
        return "P" + (self._mac("patient", patient_key) if patient_key else self._mac("no-patient", message_id))[:20]

    def reader(self, reader: str | None) -> str:
        name = " ".join((reader or "").split()).upper()
        return "R" + self._mac("reader", name)[:12] if name else ""

    def shift_days(self, patient: str) -> int:
        """The patient's offset in days: -MAX_SHIFT_DAYS..-1 or 1..MAX_SHIFT_DAYS, never 0."""
        v = int(self._mac("shift", patient)[:12], 16) % (2 * MAX_SHIFT_DAYS)
        return v - MAX_SHIFT_DAYS if v < MAX_SHIFT_DAYS else v - MAX_SHIFT_DAYS + 1

    def shift(self, when: datetime | None, patient: str) -> datetime | None:
        if when is None:
            return None
        aware = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
        return aware.astimezone(UTC) + timedelta(days=self.shift_days(patient))


def age_years(birth_date: str | None, at: datetime | date | None) -> int | None:
    """Whole years from ``birth_date`` (YYYY-MM-DD) to ``at``, capped at :data:`AGE_CAP`; None when unknown."""
    if not birth_date or at is None:
        return None
    try:
        born = date.fromisoformat(birth_date[:10])
    except ValueError:
        return None
    day = at.date() if isinstance(at, datetime) else at
    years = day.year - born.year - ((day.month, day.day) < (born.month, born.day))
    if years < 0:
        return None
    return min(years, AGE_CAP)


@dataclass
class ExportReport:
    out: Path
    fmt: str
    n_ecgs: int
    n_patients: int
    label_counts: dict[str, int]
    skipped: Counter[str] = field(default_factory=Counter)

    def lines(self) -> list[str]:
        counts = ", ".join(f"{c} {n}" for c, n in self.label_counts.items())
        left = "; ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        return [
            f"wrote {self.n_ecgs} ECG(s) of {self.n_patients} patient(s) to {self.out} "
            f"(waveforms: {self.fmt}; labels.csv, manifest.json, README.md)",
            f"confirmed positives: {counts}",
            f"left out: {left}",
        ]


def _iso(when: datetime | None) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if when is not None else ""


def _write_waveform(record: SiteRecord, folder: Path, name: str, fmt: str) -> None:
    ecg = record.ecg
    signals = np.asarray(ecg.signals, dtype=np.float64)
    if fmt == "npz":
        np.savez_compressed(
            folder / f"{name}.npz",
            signals=signals.astype(np.float32),
            leads=np.asarray(ecg.leads, dtype=str),
            fs=np.float64(ecg.fs),
            units=np.asarray(ecg.units, dtype=str),
        )
        return
    import wfdb

    n = len(ecg.leads)
    peak = float(np.nanmax(np.abs(signals))) if np.isfinite(signals).any() else 0.0
    # 1000 per unit (1 uV per step for mV, as PTB-XL and the challenge data) when it fits 16 bits, else wfdb's own gains
    fixed = {"adc_gain": [WFDB_GAIN] * n, "baseline": [0] * n} if peak * WFDB_GAIN < 32000 else {}
    wfdb.wrsamp(
        name,
        fs=float(ecg.fs),
        units=[ecg.units] * n,
        sig_name=list(ecg.leads),
        p_signal=signals.T,
        fmt=["16"] * n,
        write_dir=str(folder),
        **fixed,
    )


def _row(record: SiteRecord, deid: Deidentifier, fmt: str) -> dict[str, Any]:
    label, ecg = record.label, record.ecg
    patient = deid.patient(record.patient_key, record.message_id)
    name = deid.ecg(record.message_id)
    classes = label.labels
    return {
        "ecg": name,
        "patient": patient,
        "patient_known": int(record.patient_key is not None),
        "record": f"records/{name}",
        "acquired_at": _iso(deid.shift(record.when, patient)),
        "time_source": record.when_source,
        "read_at": _iso(deid.shift(label.read_at, patient)),
        "age_years": age_years(ecg.patient.birth_date, record.when) if ecg.patient.birth_date else "",
        "sex": ecg.patient.sex or "",
        "fs_hz": f"{ecg.fs:g}",
        "n_samples": int(ecg.signals.shape[1]),
        "leads": " ".join(ecg.leads),
        "units": ecg.units,
        **{c: ("" if classes is None else int(classes.get(c, 0))) for c in CLASSES},
        "uncertain": " ".join(c for c in CLASSES if c in label.uncertain),
        "severity4": label.severity4 or "",
        "severity3": label.severity3 or "",
        "complete": int(label.complete),
        "read_status": label.status,
        "reader": deid.reader(label.reader),
    }


def _readme(report: ExportReport, fmt: str, created: str) -> str:
    layout = (
        "`records/<ecg>.hea` + `records/<ecg>.dat`: WFDB, format 16 (16-bit; gain 1000 per unit, i.e. 1 uV steps for "
        "mV, unless a signal's range needs another: the header gives each signal's), "
        "one signal per lead, units as in the `units` column; read with `wfdb.rdrecord('records/<ecg>')`."
        if fmt == "wfdb"
        else "`records/<ecg>.npz`: NumPy, arrays `signals` (float32, leads x samples), `leads` (str), `fs` (Hz), "
        "`units` (str); read with `numpy.load('records/<ecg>.npz')`."
    )
    cells = {name: what.replace("|", "\\|") for name, what in COLUMNS.items()}  # a | would end the table cell
    columns = "\n".join(f"| `{name}` | {what} |" for name, what in cells.items())
    counts = ", ".join(f"{c} {n}" for c, n in report.label_counts.items())
    return f"""# De-identified ECG training set (ecgbridge)

Written by `ecgbridge export training-set` on {created}: {report.n_ecgs} ECGs of {report.n_patients} patients,
each with the cardiologist's confirmed read (over-read) that is its label. Confirmed positives: {counts}.
Research use only; nothing here is for clinical use.

## Files

- `labels.csv`: one row per ECG, the columns below.
- {layout}
- `manifest.json`: the same description, machine-readable.

## Columns of labels.csv

| column | content |
|---|---|
{columns}

## De-identification applied

- **Identifiers** (ECG, patient, reader) are HMAC-SHA256 pseudonyms under the site's secret, which is not
  in this folder. The site can recompute them (e.g. to add ECGs later: the same secret gives the same
  pseudonyms); without the secret they cannot be recomputed or reversed.
- **Dates** are shifted per patient by a whole number of days between -{MAX_SHIFT_DAYS} and +{MAX_SHIFT_DAYS}
  (never 0), the same for all of a patient's records: intervals between a patient's ECGs and reads and
  the time of day are exact, calendar dates are not. The window the export was selected by is not recorded.
- **Not written**: names, patient identifiers, birth dates, addresses, the ECGs' UIDs, accession and order
  numbers, device names, the free text of the reads.
- **Age** in whole years at the true date of the ECG, {AGE_CAP} meaning {AGE_CAP} or older; **sex** as given.

Limits, so that nobody over-reads this: HIPAA's Safe Harbor method (45 CFR 164.514(b)(2)) removes all
elements of dates except the year; shifted dates do not meet it, so this set is a *limited data set* (share it
under a data use agreement) unless an expert determination covers it. A waveform is a physiological
recording, not an identifier Safe Harbor lists, but rare findings in a small set can still point at a
person: check cell sizes before publishing.
"""


def export_training_set(
    store: MessageStore,
    out: Path,
    *,
    secret: bytes,
    since: datetime | None = None,
    until: datetime | None = None,
    fmt: str = "wfdb",
) -> ExportReport:
    """Write the de-identified copy of the labelled ECGs recorded in ``[since, until)`` into ``out``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown waveform format {fmt!r}; choose from {FORMATS}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EcgBridgeError(f"{out} exists and is not an empty folder: choose a new one")
    deid = Deidentifier(secret)
    skipped: Counter[str] = Counter()
    records_dir = out / "records"
    records_dir.mkdir(parents=True, exist_ok=True)
    rows, patients = [], set()
    counts = dict.fromkeys(CLASSES, 0)
    for record in iter_site_records(store, key=secret, since=since, until=until, skipped=skipped):
        row = _row(record, deid, fmt)
        _write_waveform(record, records_dir, row["ecg"], fmt)
        rows.append(row)
        patients.add(row["patient"])
        for c in CLASSES:
            counts[c] += int(row[c] or 0)
    # Rows by patient pseudonym then shifted time, never in the true order across patients; and every file
    # gets the same modification time, so neither shows the order the ECGs were recorded or written in.
    rows.sort(key=lambda r: (r["patient"], r["acquired_at"], r["ecg"]))
    with (out / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    report = ExportReport(
        out=out, fmt=fmt, n_ecgs=len(rows), n_patients=len(patients), label_counts=counts, skipped=skipped
    )
    created = datetime.now(UTC).date().isoformat()
    manifest = {
        "what": "ecgbridge de-identified ECG training set",
        "layout_version": 1,
        "created": created,
        "ecgs": report.n_ecgs,
        "patients": report.n_patients,
        "label_counts": counts,
        "left_out": dict(skipped),
        "waveforms": {
            "format": fmt,
            "folder": "records",
            "layout": "WFDB format 16 (.hea + .dat), wfdb library"
            if fmt == "wfdb"
            else "NumPy .npz: signals float32 (leads, samples), leads str, fs float (Hz), units str",
        },
        "labels": "labels.csv",
        "columns": COLUMNS,
        "deidentification": {
            "pseudonyms": "HMAC-SHA256 under the site secret (not included), hex truncated: E 20, P 20, R 12 digits",
            "date_shift": f"per patient, whole days in [-{MAX_SHIFT_DAYS}, -1] or [1, {MAX_SHIFT_DAYS}], derived from "
            "the secret; the same for all of a patient's dates",
            "age": f"whole years at the true date, capped at {AGE_CAP}",
            "removed": [
                "patient name",
                "patient identifier and issuer",
                "birth date",
                "SOP / study / series UIDs",
                "accession and order numbers",
                "device",
                "free text of the reads",
                "the selection window",
            ],
            "safe_harbor": "no: dates are shifted, not reduced to the year (a limited data set)",
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(_readme(report, fmt, created), encoding="utf-8")
    day = datetime.combine(datetime.now(UTC).date(), datetime.min.time(), tzinfo=UTC).timestamp()
    for path in out.rglob("*"):
        os.utime(path, (day, day))
    log.info("de-identified export: %d ECGs, %d patients, %s", report.n_ecgs, report.n_patients, fmt)
    return report
