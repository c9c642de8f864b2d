"""ECG measurements: agreement with the carts' own measurements, and the cost per ECG.

Prints (numbers for docs/measurements.md):

0. synthetic ECGs with exact intervals: measured minus true;
1. the Mortara cart (pydicom's waveform_ecg.dcm): our global measurements against the
   cart's (WaveformAnnotationSequence), our fiducials against the cart's median-beat
   fiducials, our beats against its 10 annotated beats, our R amplitudes against its own
   MEDIAN BEAT group measured at its own fiducials;
2. the Philips carts (../shared/data/vendor-xml/philips-sierra): ours against the
   cart's ``internalmeasurements`` / ``interpretationmeasurements``;
3. PTB-XL: its CSV has no interval columns; its ``heart_axis`` category against the
   sign pattern of our net QRS areas (signs survive the subset's z-scoring);
4. milliseconds per ECG for :func:`inference.features.measure` (1000, 500 and 100 Hz);
5. when neurokit2 is importable (it is not a dependency): its DWT delineation of the
   Mortara ECG, for the record of why we do not use it.

    python -m bench.features [--data ../shared/data] [--repeat 20]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

from ecgbridge.inference.features import detect_beats, measure
from ecgbridge.mapping.dicom_waveform import median_beat, to_ecg
from ecgbridge.mapping.ecg import Ecg
from tests.support.cart_measurements import cart_measurements

REPO = Path(__file__).resolve().parents[1]
KEYS = ("heart_rate", "pr_interval", "qrs_duration", "qt_interval", "qtc_interval", "p_axis", "qrs_axis", "t_axis")
UNITS = {"heart_rate": "/min", "p_axis": "deg", "qrs_axis": "deg", "t_axis": "deg"}


def _row(name: str, ours: float | None, cart: float | None) -> str:
    unit = UNITS.get(name, "ms")
    if ours is None or cart is None:
        return f"| {name} ({unit}) | {ours if ours is not None else '-'} | {cart if cart is not None else '-'} | - |"
    return f"| {name} ({unit}) | {ours:.1f} | {cart:.1f} | {ours - cart:+.1f} |"


def mortara() -> None:
    ds = pydicom.dcmread(get_testdata_file("waveform_ecg.dcm"))
    ecg = to_ecg(ds)
    m = measure(ecg)
    ours, cart = m.as_dict(), cart_measurements(ds)
    print("## 1. Mortara el250 (waveform_ecg.dcm, 1000 Hz, 10 s): ours vs the cart\n")
    print("| measurement | ours | cart | difference |\n|---|---|---|---|")
    print(_row("rr_interval", m.rr_interval, cart.get("rr_interval")))
    for key in KEYS:
        print(_row(key, ours.get(key), cart.get(key)))
    print(
        f"\nQTc Fridericia (ours): {m.qtc_fridericia:.1f} ms; the cart's QTc 370 lies between our "
        f"Bazett-from-its-QT {cart['qt_interval'] / math.sqrt(cart['rr_interval'] / 1000):.1f} and "
        f"Fridericia-from-its-QT {cart['qt_interval'] / (cart['rr_interval'] / 1000) ** (1 / 3):.1f}."
    )
    print(f"flags: {list(m.flags)}; beats detected {m.n_beats}, in the median {m.n_beats_median}")

    # fiducials of the cart's median beat (annotation group 2), relative to its fiducial point
    fid: dict[str, int] = {}
    beats: dict[int, int] = {}
    for item in ds.WaveformAnnotationSequence:
        if "ReferencedSamplePositions" not in item or "ConceptNameCodeSequence" not in item:
            continue
        meaning = str(item.ConceptNameCodeSequence[0].CodeMeaning)
        group = int(item.AnnotationGroupNumber)
        if group == 2:
            fid[meaning] = int(item.ReferencedSamplePositions)
        elif group >= 100 and meaning == "Fiducial Point":
            beats[group] = int(item.ReferencedSamplePositions)
    r = fid["Fiducial Point"]
    cart_rel = {
        "p_onset": fid["P Onset"] - r,
        "p_offset": fid["P Offset"] - r,
        "qrs_onset": fid["QRS Onset"] - r,
        "qrs_offset": fid["QRS Offset"] - r,
        "t_end": fid["T Offset"] - r,
    }
    f = m.fiducials
    assert f is not None
    ours_rel = {
        "p_onset": f.p_onset,
        "p_offset": f.p_offset,
        "qrs_onset": f.qrs_onset,
        "qrs_offset": f.qrs_offset,
        "t_end": f.t_end,
    }
    print("\nMedian-beat fiducials, ms from each one's own QRS fiducial point (ours: QRS energy peak):\n")
    print("| fiducial | ours | cart | difference |\n|---|---|---|---|")
    for key, value in cart_rel.items():
        print(_row(key, ours_rel[key], float(value)).replace(" (ms)", ""))

    # our beats vs the cart's 10 annotated beats
    ours_beats = detect_beats(ecg)
    cart_beats = np.array(sorted(beats.values()))
    nearest = [int(ours_beats[np.argmin(np.abs(ours_beats - b))] - b) for b in cart_beats]
    print(
        f"\nBeats: ours {len(ours_beats)}, cart {len(cart_beats)}; our beat minus the cart's fiducial "
        f"point, ms: {nearest}"
    )

    # R amplitude per lead: ours (our median, our fiducials) vs the cart's median beat at its fiducials
    cm = median_beat(ds)
    assert cm is not None and m.r_amplitude is not None and m.s_amplitude is not None
    on, off = fid["QRS Onset"], fid["QRS Offset"]
    diffs_r, diffs_s = [], []
    cells = []
    for i, lead in enumerate(cm.leads):
        seg = cm.signals[i, on : off + 1].astype(float) - float(cm.signals[i, on - 10 : on + 1].mean())
        k = int(np.argmax(seg))
        cr, cs = max(0.0, float(seg.max())), max(0.0, -float(seg[k:].min()))
        diffs_r.append(m.r_amplitude[lead] - cr)
        diffs_s.append(m.s_amplitude[lead] - cs)
        cells.append(f"{lead} {m.r_amplitude[lead]:.2f}/{cr:.2f}")
    print("\nR amplitude, mV, ours/cart median beat: " + ", ".join(cells))
    print(
        f"R: max |difference| {max(abs(d) for d in diffs_r):.3f} mV, mean {statistics.mean(diffs_r):+.3f}; "
        f"S: max |difference| {max(abs(d) for d in diffs_s):.3f} mV, mean {statistics.mean(diffs_s):+.3f}"
    )
    print(
        f"Sokolow-Lyon {m.sokolow_lyon:.2f} mV, Cornell {m.cornell:.2f} mV, QRS morphology "
        f"{m.qrs_morphology}, Q waves {list(m.q_waves or ())}, T inversion {list(m.t_inversion or ())}, "
        f"fragmented QRS {list(m.fragmented_qrs or ())}"
    )


_PHILIPS_TAGS = {
    "heart_rate": ("meanventrate", "heartrate"),
    "pr_interval": ("meanprint",),
    "qrs_duration": ("meanqrsdur",),
    "qt_interval": ("meanqtint",),
    "qtc_interval": ("meanqtc",),
    "p_axis": ("pfrontaxis",),
    "qrs_axis": ("qrsfrontaxis",),
    "t_axis": ("tfrontaxis",),
}


def _philips_values(path: Path) -> dict[str, float]:
    raw = path.read_bytes()
    text = raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8", "replace")
    out: dict[str, float] = {}
    for key, tags in _PHILIPS_TAGS.items():
        for tag in tags:
            hit = re.search(rf"<{tag}>\s*(-?\d+(?:\.\d+)?)\s*</{tag}>", text)
            if hit:
                out[key] = float(hit.group(1))
                break
    return out


def philips(data: Path) -> None:
    from ecgbridge.mapping.readers import read_ecg_file

    folder = data / "vendor-xml" / "philips-sierra"
    files = [p for p in sorted(folder.glob("*")) if p.suffix.lower() == ".xml" and "converted" not in p.name]
    if not files:
        print("\n## 2. Philips: no files (skipped)")
        return
    print("\n## 2. Philips carts (Sierra ECG XML, 500 Hz): ours vs the cart (ours / cart / difference)\n")
    print("| record | " + " | ".join(KEYS) + " |\n|---|" + "---|" * len(KEYS))
    diffs: dict[str, list[float]] = {k: [] for k in KEYS}
    inst: list[str] = []
    for path in files:
        ecg = read_ecg_file(path)
        m = measure(ecg)
        ours, cart = m.as_dict(), _philips_values(path)
        cells = []
        for key in KEYS:
            a, b = ours.get(key), cart.get(key)
            if a is None or b is None:
                cells.append(f"{a if a is not None else '-'} / {b if b is not None else '-'}")
            else:
                cells.append(f"{a:.0f} / {b:.0f} / {a - b:+.0f}")
                diffs[key].append(a - b)
        print(f"| {path.name[:24]} | " + " | ".join(cells) + " |")
        # Philips' mean rate is the mean of the beat-to-beat rates, not 60 / mean RR
        beats = detect_beats(ecg)
        inst.append(f"{path.name[:12]} {statistics.mean(60 * ecg.fs / np.diff(beats)):.1f}")
    print(
        "\nmean difference (n): "
        + "; ".join(f"{k} {statistics.mean(v):+.1f} ({len(v)})" for k, v in diffs.items() if v)
    )
    print("mean of beat-to-beat rates (/min), Philips' convention: " + ", ".join(inst))


def ptbxl_axis(data: Path) -> None:
    import pandas as pd

    from ecgbridge.mapping.wfdb_record import read_wfdb

    base = data / "ptbxl-subset"
    csv = base / "ptbxl_database.csv"
    if not csv.is_file():
        print("\n## 3. PTB-XL: no subset (skipped)")
        return
    df = pd.read_csv(csv)
    interval_columns = [
        c for c in df.columns if re.search(r"interval|duration|^(pr|qrs|qt|qtc|rr|heart_?rate)(_|$)", c, re.IGNORECASE)
    ]
    print(
        f"\n## 3. PTB-XL subset ({len(df)} records): interval columns in ptbxl_database.csv: "
        f"{interval_columns or 'none'}; heart_axis given for {int(df.heart_axis.notna().sum())}\n"
    )
    table: dict[str, dict[str, int]] = {}
    for row in df[df.heart_axis.notna()].itertuples():
        ecg = read_wfdb(base / row.filename_lr)
        # signs of net QRS areas survive per-lead z-scoring: measure as if mV, use signs only
        m = measure(replace(ecg, flags=tuple(f for f in ecg.flags if f != "units:zscore")))
        area = m.qrs_area or {}
        if not {"I", "II", "aVF"} <= set(area):
            cls = "unmeasured"
        elif area["I"] >= 0 and area["II"] >= 0:
            cls = "-30..90 (I+, II+)"
        elif area["I"] >= 0:
            cls = "< -30 (I+, II-)"
        elif area["aVF"] >= 0:
            cls = "> 90 (I-, aVF+)"
        else:
            cls = "-90..-180 (I-, aVF-)"
        table.setdefault(str(row.heart_axis), {}).setdefault(cls, 0)
        table[str(row.heart_axis)][cls] += 1
    columns = ["-30..90 (I+, II+)", "< -30 (I+, II-)", "> 90 (I-, aVF+)", "-90..-180 (I-, aVF-)", "unmeasured"]
    print("| PTB-XL heart_axis | n | " + " | ".join(columns) + " |\n|---|---|" + "---|" * len(columns))
    for label in ("MID", "LAD", "ALAD", "RAD", "ARAD", "AXL", "AXR", "SAXIS"):
        if label in table:
            counts = table[label]
            print(f"| {label} | {sum(counts.values())} | " + " | ".join(str(counts.get(c, 0)) for c in columns) + " |")


def cost(data: Path, repeat: int) -> None:
    from ecgbridge.mapping.wfdb_record import read_wfdb

    cases: list[tuple[str, Ecg]] = [
        ("Mortara 12 x 10 s @ 1000 Hz", to_ecg(pydicom.dcmread(get_testdata_file("waveform_ecg.dcm")))),
        ("E07506 12 x 10 s @ 500 Hz", read_wfdb(REPO / "tests/fixtures/wfdb/E07506")),
    ]
    cases.append(("PTB-XL 00024 12 x 10 s @ 100 Hz", read_wfdb(REPO / "tests/fixtures/wfdb/00024_lr")))
    challenge = sorted((data / "challenge" / "cinc2021").glob("*.hea"))
    print(f"\n## 4. Cost of measure() per ECG (median of {repeat} runs, one process, {os.cpu_count()} CPUs shared)\n")
    for name, ecg in cases:
        measure(ecg)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            measure(ecg)
            times.append((time.perf_counter() - t0) * 1000)
        print(f"- {name}: {statistics.median(times):.1f} ms (min {min(times):.1f}, max {max(times):.1f})")
    if challenge:
        ecgs = [read_wfdb(p.with_suffix("")) for p in challenge]
        t0 = time.perf_counter()
        for ecg in ecgs:
            measure(ecg)
        print(f"- {len(ecgs)} challenge records @ 500 Hz: {(time.perf_counter() - t0) * 1000 / len(ecgs):.1f} ms each")


def neurokit() -> None:
    try:
        import warnings

        warnings.filterwarnings("ignore")
        import neurokit2 as nk
    except ImportError:
        print("\n## 5. neurokit2 not importable: skipped")
        return
    ds = pydicom.dcmread(get_testdata_file("waveform_ecg.dcm"))
    ecg = to_ecg(ds)
    fs = int(ecg.fs)
    print(f"\n## 5. neurokit2 {nk.__version__} on the Mortara ECG, lead II (median over beats, ms)\n")
    print("| method | ms / lead | PR | QRS | QT | QRS offsets missing |\n|---|---|---|---|---|---|")
    clean = nk.ecg_clean(ecg.lead("II").astype(float), sampling_rate=fs)
    _, info = nk.ecg_peaks(clean, sampling_rate=fs)
    peaks = info["ECG_R_Peaks"]
    for method in ("dwt", "prominence"):
        t0 = time.perf_counter()
        _, w = nk.ecg_delineate(clean, peaks, sampling_rate=fs, method=method)
        dt = (time.perf_counter() - t0) * 1000
        on, off = np.array(w["ECG_R_Onsets"], float), np.array(w["ECG_R_Offsets"], float)
        p_on, t_off = np.array(w["ECG_P_Onsets"], float), np.array(w["ECG_T_Offsets"], float)
        n = min(len(on), len(off), len(p_on), len(t_off))

        def med(a: np.ndarray) -> float:
            return float(np.nanmedian(a)) * 1000 / fs

        print(
            f"| {method} | {dt:.0f} | {med(on[:n] - p_on[:n]):.0f} | {med(off[:n] - on[:n]):.0f} | "
            f"{med(t_off[:n] - on[:n]):.0f} | {int(np.isnan(off).sum())} of {len(off)} |"
        )
    print("| cart | - | 161 | 75 | 368 | - |")


def synthetic() -> None:
    from tests.unit.test_features import qrs_axis_of, synthetic_ecg

    print(
        "\n## 0. Synthetic ECGs with exact intervals (tests/unit/test_features.py; 10 uV noise, "
        "0.1 mV wander): measured - true\n"
    )
    print(
        "| fs (Hz) | HR | true PR / QRS / QT (ms) | PR | QRS | QT | P / QRS / T axis (deg) |\n|---|---|---|---|---|---|---|"
    )
    for fs, hr, pr, qrs, qt in [
        (500.0, 60, 160, 90, 400),
        (1000.0, 75, 200, 100, 380),
        (500.0, 100, 140, 80, 320),
        (500.0, 50, 280, 100, 480),
        (250.0, 70, 180, 90, 420),
        (500.0, 60, 160, 130, 440),
    ]:
        m = measure(synthetic_ecg(fs=fs, hr=hr, pr=pr / 1000, qrs=qrs / 1000, qt=qt / 1000))
        assert m.pr_interval is not None and m.qrs_duration is not None and m.qt_interval is not None
        assert m.p_axis is not None and m.qrs_axis is not None and m.t_axis is not None
        print(
            f"| {fs:.0f} | {hr} | {pr} / {qrs} / {qt} | {m.pr_interval - pr:+.0f} | {m.qrs_duration - qrs:+.0f} | "
            f"{m.qt_interval - qt:+.0f} | {m.p_axis - 60:+.1f} / {m.qrs_axis - qrs_axis_of(qrs / 1000):+.1f} / "
            f"{m.t_axis - 45:+.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    env = os.environ.get("ECGBRIDGE_SHARED_DATA")
    parser.add_argument("--data", type=Path, default=Path(env) if env else REPO.parent / "shared" / "data")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    synthetic()
    mortara()
    philips(args.data)
    ptbxl_axis(args.data)
    cost(args.data, args.repeat)
    neurokit()


if __name__ == "__main__":
    main()
