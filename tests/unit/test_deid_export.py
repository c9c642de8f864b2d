"""``ecgbridge export training-set``: the de-identified research copy of the site's over-read ECGs.

A real store (SQLite, and PostgreSQL at 127.0.0.1:5432) holding DICOM ECGs made from the committed
PTB-XL fixtures with synthetic patients, and their confirmed reads recorded as the HL7 listener
records them (tests/support/site_store.py). The export must refuse without a secret, contain no
identifier of the store (grepped in every file written), shift each patient's dates by one offset,
match the store's labels and write waveforms that read back.
"""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from ecgbridge.cli import main
from ecgbridge.core.deid import AGE_CAP, MAX_SHIFT_DAYS, Deidentifier, age_years, secret_from_env
from ecgbridge.core.store import MessageStore
from ecgbridge.errors import ConfigError
from ecgbridge.mapping.readers import read_ecg_bytes
from tests.support.site_store import SiteEcg, build_site_store, site_config

SECRET = "correct-horse-battery-staple-0123456789"
ENV = "ECGBRIDGE_DEID_SECRET"


def _store(folder: Path, database_url: str | None) -> MessageStore:
    store = MessageStore(database_url or f"sqlite:///{folder / 'ecgbridge.db'}", folder)
    store.create_schema()
    return store


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "labels.csv").open(newline="", encoding="utf-8") as fh:
        return {row["ecg"]: row for row in csv.DictReader(fh)}


def _identifiers(made: list[SiteEcg]) -> set[str]:
    found: set[str] = {"Heart&Anna", "Anna", "Quintessa"}
    for e in made:
        found |= {e.message_id, e.sop_instance_uid}
        if e.patient_id:
            found.add(e.patient_id)
        if e.patient_name:
            found |= {e.patient_name, e.patient_name.split("^")[1]}
        if e.birth_date:
            found |= {e.birth_date, e.birth_date.replace("-", "")}
    return found


def _when(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def test_the_export_is_refused_without_a_secret_and_with_a_short_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = site_config(tmp_path)
    monkeypatch.delenv(ENV, raising=False)
    assert main(["export", "training-set", "--config", str(config), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert ENV in err and "refused" in err
    monkeypatch.setenv("MY_SITE_SECRET", "short")
    argv = ["export", "training-set", "--config", str(config), "--out", str(tmp_path / "x")]
    assert main([*argv, "--secret-env", "MY_SITE_SECRET"]) == 2
    assert "MY_SITE_SECRET has 5 characters" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError):
        secret_from_env("X", environ={})


def test_pseudonyms_shifts_and_ages_follow_the_rules() -> None:
    a, b = Deidentifier(SECRET.encode()), Deidentifier(b"another-secret-of-enough-length")
    assert a.ecg("m1") == Deidentifier(SECRET.encode()).ecg("m1") != b.ecg("m1")
    assert a.ecg("m1").startswith("E") and len(a.ecg("m1")) == 21
    assert a.patient(None, "m1") != a.patient(None, "m2")  # no patient: each ECG its own
    shifts = [a.shift_days(f"P{i}") for i in range(2000)]
    assert 0 not in shifts and min(shifts) == -MAX_SHIFT_DAYS and max(shifts) == MAX_SHIFT_DAYS
    when = datetime(2026, 3, 1, 10, 15, tzinfo=UTC)
    assert a.shift(when, "P1") - when == timedelta(days=a.shift_days("P1"))
    assert age_years("1950-06-02", datetime(2026, 6, 1)) == 75 and age_years("1950-06-02", datetime(2026, 6, 2)) == 76
    assert age_years("1921-02-03", datetime(2026, 1, 1)) == AGE_CAP and age_years(None, when) is None
    assert age_years("not a date", when) is None
    with pytest.raises(ValueError):
        Deidentifier(b"short")


def test_the_export_names_nobody_keeps_each_patients_intervals_and_matches_the_store(
    tmp_path: Path, database_url: str | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import wfdb

    store = _store(tmp_path / "site", database_url)
    made = build_site_store(store, n_patients=5, ecgs_per_patient=3, anonymous=1)
    config = site_config(tmp_path / "site", database_url)
    monkeypatch.setenv(ENV, SECRET)
    out = tmp_path / "export"
    assert main(["export", "training-set", "--config", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "wrote 16 ECG(s) of 6 patient(s)" in printed.out

    # nothing that identifies a patient, an ECG or a reader, in any file (the binary ones too)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".csv", ".json", ".md", ".hea", ".dat"}
    for path in files:
        data = path.read_bytes()
        for secret_thing in _identifiers(made) | {SECRET}:
            assert secret_thing.encode() not in data, f"{secret_thing!r} in {path.name}"
    for text in (printed.out, printed.err):
        assert not any(s in text for s in _identifiers(made))

    deid = Deidentifier(SECRET.encode())
    rows = _rows(out)
    assert len(rows) == len(made)
    # neither the rows nor the files' times give the true order of the ECGs across patients
    order = [(r["patient"], r["acquired_at"]) for r in rows.values()]
    assert order == sorted(order)
    assert len({p.stat().st_mtime for p in files}) == 1
    by_patient: dict[str, set[timedelta]] = {}
    for truth in made:
        row = rows[deid.ecg(truth.message_id)]
        # labels as the store holds them
        assert {c: int(row[c]) for c in truth.labels} == truth.labels
        assert tuple(row["uncertain"].split()) == truth.uncertain
        assert row["read_status"] == "F" and row["complete"] == "1" and row["reader"].startswith("R")
        assert row["patient_known"] == ("1" if truth.patient_id else "0")
        # one shift per patient, never 0, within the range; the read moved with it
        shift = _when(row["acquired_at"]) - truth.acquired_at
        assert shift == _when(row["read_at"]) - truth.read_at
        assert shift.days != 0 and abs(shift.days) <= MAX_SHIFT_DAYS and shift.seconds == 0
        by_patient.setdefault(row["patient"], set()).add(shift)
        # age in years, capped; sex kept
        expected_age = "" if truth.birth_date is None else str(age_years(truth.birth_date, truth.acquired_at))
        assert row["age_years"] == expected_age and row["sex"] == "female"
        # the waveform reads back as the stored ECG
        record = wfdb.rdrecord(str(out / row["record"]))
        stored = store.get(truth.message_id)
        assert stored is not None
        ecg = read_ecg_bytes(store.read_blob(stored.blob_sha256), hint="dicom")
        assert list(record.sig_name) == list(ecg.leads) == row["leads"].split()
        assert record.fs == ecg.fs == float(row["fs_hz"]) and record.sig_len == int(row["n_samples"])
        assert np.allclose(record.p_signal.T, ecg.signals, atol=2e-3)
    assert all(len(shifts) == 1 for shifts in by_patient.values())
    assert len(by_patient) == 6 and len({next(iter(s)) for s in by_patient.values()}) > 1
    ages = {rows[deid.ecg(t.message_id)]["age_years"] for t in made if t.birth_date == "1921-02-03"}
    assert ages == {str(AGE_CAP)}

    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["ecgs"] == 16
        and manifest["patients"] == 6
        and set(manifest["columns"]) == set(next(iter(rows.values())))
    )
    readme = (out / "README.md").read_text()
    assert "limited data set" in readme and "Safe Harbor" in readme and "90 or older" in readme


def test_npz_waveforms_a_time_window_and_a_used_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _store(tmp_path / "site", None)
    made = build_site_store(store, n_patients=3, ecgs_per_patient=2, anonymous=0)
    config = site_config(tmp_path / "site")
    monkeypatch.setenv(ENV, SECRET)
    out = tmp_path / "npz"
    since = "2026-01-08"  # leaves out patients 0 and 1's first ECGs (days 0 and 2)
    argv = ["export", "training-set", "--config", str(config), "--format", "npz", "--since", since]
    assert main([*argv, "--out", str(out)]) == 0
    rows = _rows(out)
    kept = [e for e in made if e.acquired_at >= datetime(2026, 1, 8, tzinfo=UTC)]
    assert len(rows) == len(kept) == 4
    deid = Deidentifier(SECRET.encode())
    for truth in kept:
        row = rows[deid.ecg(truth.message_id)]
        with np.load(out / f"{row['record']}.npz") as z:
            assert z["signals"].dtype == np.float32 and z["signals"].shape == (12, int(row["n_samples"]))
            assert list(z["leads"]) == row["leads"].split() and float(z["fs"]) == float(row["fs_hz"])
            assert str(z["units"]) == "mV"
    assert since not in (out / "manifest.json").read_text() and since not in (out / "README.md").read_text()
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 1  # the folder is not empty: refused, nothing overwritten
    assert "not an empty folder" in capsys.readouterr().err


def test_the_export_commands_have_help(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["export", "--help"], ["export", "training-set", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--secret-env" in out and ENV in out
