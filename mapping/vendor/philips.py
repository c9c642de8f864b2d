"""Philips Sierra ECG XML (1.03, 1.04, 1.04.01, 1.04.02) -> the canonical :class:`~mapping.ecg.Ecg`.

Why the pieces are where they are:

* **XLI decompression** (LZW with 10-bit codes, then a second-difference delta code)
  comes from the MIT-licensed ``sierraecg`` package (pinned: its ``LzwDecoder`` and
  ``xli_decode_deltas`` are the reference implementation, by the author of the
  format's public description). The chunk loop is ours so that a corrupt or hostile
  file fails fast: ``sierraecg.xli.xli_decode`` loops forever on a negative chunk
  size and has no bound on the LZW output.
* **Everything else** is read here rather than with ``sierraecg.read_file``, which
  returns raw counts (no resolution, no patient or acquisition data) and always
  rebuilds III/aVR/aVL/aVF in int16, whether or not the file stores them as residuals.
* **Derived leads.** XLI files store III, aVR, aVL and aVF as residuals from the value
  the cart computes from I and II. Which form a file holds is decided from the data,
  lead by lead: the reconstruction is used when it fits Einthoven/Goldberger
  (III = II - I, ...) better than the stored values do (flag
  ``philips_residual_leads:...``).
* **Calibration pulse.** The 11 s Philips strips end with about 0.4 s of a 1 mV
  calibration pulse, identical in every lead. It is not the patient's signal, so it is
  cut off (flag ``calibration_trimmed:0.40s``).

Values are (counts - signal offset) x resolution (uV) -> mV.
"""

from __future__ import annotations

import base64
import binascii
import math
import uuid
from datetime import datetime
from xml.etree.ElementTree import Element

import numpy as np
from sierraecg.lzw import LzwDecoder
from sierraecg.xli import xli_decode_deltas

from ecgbridge.errors import DecodeError, UnsupportedInputError, WaveformError
from ecgbridge.mapping.dicom_waveform import standardise_leads
from ecgbridge.mapping.ecg import STANDARD_LEADS, Ecg, Patient, Study
from ecgbridge.mapping.vendor._signal import trim_calibration
from ecgbridge.mapping.vendor._xml import child, text, to_float, uid_from_id

__all__ = ["NAMESPACE", "SUPPORTED_VERSIONS", "to_ecg", "read_counts", "xli_decode"]

NAMESPACE = "http://www3.medical.philips.com"
SUPPORTED_VERSIONS: tuple[str, ...] = ("1.03", "1.04", "1.04.01", "1.04.02")

_LEAD_BY_LOWER = {lead.lower(): lead for lead in STANDARD_LEADS}
_STANDARD_ACQUISITIONS = ("STD-12", "10-WIRE")
_MAX_LEADS = 16
_SEX = {"male": "male", "female": "female", "unknown": "unknown"}


def to_ecg(root: Element) -> Ecg:
    """The rhythm strip of a Philips ``restingecgdata`` document as an Ecg in mV."""
    version = _check_version(root)
    counts, fs, resolution_uv, offset, dropped, flags = read_counts(root)
    by_lead = {lead: (values.astype(np.float64) - offset) * resolution_uv * 1e-3 for lead, values in counts.items()}
    signals, leads, lead_flags = standardise_leads(by_lead, dropped)
    patient, patient_flags = _patient(root)
    return Ecg(
        signals=signals,
        leads=leads,
        fs=fs,
        patient=patient,
        study=_study(root),
        source_format="philips",
        units="mV",
        flags=tuple(lead_flags) + tuple(flags) + (f"philips_version:{version}",) + tuple(patient_flags),
    )


def read_counts(root: Element) -> tuple[dict[str, np.ndarray], float, float, float, list[str], list[str]]:
    """Decoded leads in counts: (counts by lead, fs, resolution uV, offset, dropped, flags)."""
    signal = child(root, "dataacquisition", "signalcharacteristics")
    waves = next(root.iter(f"{{{NAMESPACE}}}parsedwaveforms"), None)
    if waves is None:
        waves = next((e for e in root.iter() if e.tag.endswith("parsedwaveforms")), None)
    if waves is None:
        raise WaveformError("no rhythm waveform: Philips file has no parsedwaveforms element")

    fs = to_float(waves.get("samplespersecond") or text(signal, "samplingrate"), "Philips sampling rate")
    if fs <= 0:
        raise WaveformError(f"Philips sampling rate must be > 0 (got {fs:g})")
    resolution = to_float(
        waves.get("resolution") or text(signal, "resolution") or text(signal, "signalresolution"),
        "Philips signal resolution (uV per count)",
    )
    if resolution <= 0:
        raise WaveformError(f"Philips signal resolution must be > 0 (got {resolution:g})")
    offset = to_float(waves.get("signaloffset") or text(signal, "signaloffset") or "0", "Philips signal offset")
    bits = waves.get("bitspersample") or waves.get("nbitspersample") or text(signal, "bitspersample") or "16"
    if bits.strip() != "16":
        raise WaveformError(f"Philips bits per sample {bits.strip()} is not supported (16 only)")
    duration_ms = to_float(waves.get("durationperchannel"), "Philips parsedwaveforms durationperchannel")
    exact = duration_ms * fs / 1000.0
    if not math.isfinite(exact):
        raise WaveformError(f"Philips durationperchannel {duration_ms:g} ms at {fs:g} Hz is out of range")
    n_samples = int(round(exact))
    if n_samples <= 0:
        raise WaveformError(f"Philips durationperchannel {duration_ms:g} ms gives no samples")

    labels = _labels(waves, signal)
    encoding = (waves.get("dataencoding") or "").strip()
    if encoding.lower() != "base64":
        raise WaveformError(f"Philips waveform data encoding {encoding or '(none)'} is not Base64")
    try:
        payload = base64.b64decode("".join((waves.text or "").split()), validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError("Philips waveform data is not valid Base64") from None
    if not payload:
        raise WaveformError("no rhythm waveform: Philips parsedwaveforms is empty")

    method = _compression(waves)
    if method == "XLI":
        chunks = xli_decode(payload, n_samples)
    elif method == "NONE":
        chunks = _uncompressed(payload, len(labels), n_samples)
    else:
        raise UnsupportedInputError(f"Philips waveform compression {method} is not supported (XLI or none)")
    if len(chunks) < len(labels):
        raise WaveformError(f"Philips waveform holds {len(chunks)} leads but {len(labels)} are labelled")

    counts: dict[str, np.ndarray] = {}
    dropped: list[str] = []
    for number, (label, samples) in enumerate(zip(labels, chunks), start=1):
        lead = _LEAD_BY_LOWER.get(label.strip().lower())
        if lead is None:
            dropped.append(label.strip() or f"channel {number}")
            continue
        if lead in counts:
            raise WaveformError(f"Philips waveform: lead {lead} appears twice")
        if len(samples) < n_samples:
            raise WaveformError(
                f"Philips lead {lead} has {len(samples)} samples; durationperchannel "
                f"{duration_ms:g} ms at {fs:g} Hz needs {n_samples}"
            )
        counts[lead] = np.asarray(samples[:n_samples], dtype=np.int64)
    # XLI files carry 16 channels for 12 labels; the spare ones hold only the
    # calibration pulse. One with more than that is a channel we cannot name.
    spare = [c for c in chunks[len(labels) :] if np.count_nonzero(c) > fs * 1.0]
    if spare:
        dropped.append(f"{len(spare)} unlabelled channel(s)")

    flags: list[str] = []
    residual = _rebuild_residual_leads(counts)
    if residual:
        flags.append("philips_residual_leads:" + ",".join(residual))
    trimmed = trim_calibration(counts, fs)
    if trimmed:
        flags.append(f"calibration_trimmed:{trimmed / fs:.2f}s")
    return counts, fs, resolution, offset, dropped, flags


def xli_decode(payload: bytes, n_samples: int) -> list[np.ndarray]:
    """XLI-compressed leads -> int samples per lead, refusing malformed chunk headers.

    A chunk is an 8-byte header (int32 LE size, 2 unused bytes, int16 LE first sample)
    followed by ``size`` bytes of LZW codes; the decoded bytes (high bytes, then low
    bytes) are second-difference deltas (sierraecg's ``xli_decode_deltas``).
    """
    limit = 2 * n_samples + 2  # bytes one lead may decode to
    leads: list[np.ndarray] = []
    offset = 0
    while offset < len(payload):
        number = len(leads) + 1
        if len(leads) >= _MAX_LEADS:
            raise DecodeError(f"XLI data holds more than {_MAX_LEADS} leads")
        header = payload[offset : offset + 8]
        if len(header) < 8:
            raise DecodeError(f"XLI data is truncated: lead {number} header is {len(header)} of 8 bytes")
        size = int.from_bytes(header[0:4], "little", signed=True)
        first = int.from_bytes(header[6:8], "little", signed=True)
        offset += 8
        if size <= 0 or offset + size > len(payload):
            raise DecodeError(
                f"XLI data is corrupt or truncated: lead {number} declares {size} bytes, {len(payload) - offset} remain"
            )
        chunk = payload[offset : offset + size]
        offset += size
        decoder = LzwDecoder(chunk, bits=10)
        buffer: list[int] = []
        try:
            while (byte := decoder.read()) != -1:
                buffer.append(byte & 0xFF)
                if len(buffer) > limit:
                    raise DecodeError(f"XLI data is corrupt: lead {number} decodes to more than {n_samples} samples")
            if len(buffer) % 2:
                buffer.append(0)
            if len(buffer) < 4:
                raise DecodeError(f"XLI data is corrupt: lead {number} decodes to {len(buffer) // 2} samples")
            leads.append(np.asarray(xli_decode_deltas(buffer, first), dtype=np.int64))
        except DecodeError:
            raise
        except (IndexError, KeyError, ValueError, OverflowError) as exc:
            raise DecodeError(
                f"XLI data is corrupt: lead {number} could not be decompressed ({type(exc).__name__})"
            ) from exc
    return leads


# ------------------------------------------------------------------------ internals


def _check_version(root: Element) -> str:
    doc_type = text(root, "documentinfo", "documenttype") or "(no type)"
    version = text(root, "documentinfo", "documentversion") or "(no version)"
    if doc_type not in ("SierraECG", "PhilipsECG") or version not in SUPPORTED_VERSIONS:
        raise UnsupportedInputError(
            f"Philips document {doc_type} {version} is not supported "
            f"(SierraECG / PhilipsECG {', '.join(SUPPORTED_VERSIONS)})"
        )
    return version


def _labels(waves: Element, signal: Element | None) -> list[str]:
    labels = (waves.get("leadlabels") or "").split()
    if labels:
        count = waves.get("numberofleads")
        return labels[: int(count)] if count and count.strip().isdigit() else labels
    acquisition = (text(signal, "acquisitiontype") or "").upper()
    channels = text(signal, "numberchannelsvalid") or text(signal, "numberchannelsallocated") or ""
    if acquisition in _STANDARD_ACQUISITIONS and channels.isdigit():
        n = int(channels)
        return [STANDARD_LEADS[i] if i < 12 else f"channel {i + 1}" for i in range(n)]
    raise WaveformError(
        f"Philips waveform leads are not named: no leadlabels and acquisition type "
        f"{acquisition or '(none)'} is not {' or '.join(_STANDARD_ACQUISITIONS)}"
    )


def _compression(waves: Element) -> str:
    flag = (waves.get("compressflag") or "").strip().lower()
    method = (waves.get("compressmethod") or waves.get("compression") or "").strip().upper()
    if flag == "false" or method in ("", "NONE", "UNCOMPRESSED"):
        return "NONE"
    return method


def _uncompressed(payload: bytes, n_leads: int, n_samples: int) -> list[np.ndarray]:
    need = n_leads * n_samples * 2
    if len(payload) < need:
        raise WaveformError(
            f"Philips uncompressed waveform is truncated: {len(payload)} bytes, "
            f"{n_leads} leads x {n_samples} samples need {need}"
        )
    values = np.frombuffer(payload[:need], dtype="<i2").astype(np.int64)
    return list(values.reshape(n_leads, n_samples))


def _rebuild_residual_leads(counts: dict[str, np.ndarray]) -> list[str]:
    """Replace residual-coded III/aVR/aVL/aVF by the real leads; returns those rebuilt."""
    if "I" not in counts or "II" not in counts:
        return []
    i, ii = counts["I"], counts["II"]
    rebuilt: list[str] = []

    def choose(name: str, reconstructed: np.ndarray, expected: np.ndarray) -> None:
        raw = counts[name]
        if np.mean(np.abs(reconstructed - expected)) < np.mean(np.abs(raw - expected)):
            counts[name] = reconstructed
            rebuilt.append(name)

    if "III" in counts:
        choose("III", ii - i - counts["III"], (ii - i).astype(np.float64))
    iii = counts.get("III", ii - i)
    if "aVR" in counts:
        choose("aVR", -counts["aVR"] - np.floor_divide(i + ii, 2), -(i + ii) / 2.0)
    if "aVL" in counts:
        choose("aVL", np.floor_divide(i - iii, 2) - counts["aVL"], i - ii / 2.0)
    if "aVF" in counts:
        choose("aVF", np.floor_divide(ii + iii, 2) - counts["aVF"], ii - i / 2.0)
    return rebuilt


def _patient(root: Element) -> tuple[Patient, list[str]]:
    general = child(root, "patient", "generalpatientdata")
    patient_id = text(general, "patientid") or text(general, "MRN") or text(general, "uniquepatientid")
    last, first = text(general, "name", "lastname"), text(general, "name", "firstname")
    name = "^".join(part or "" for part in (last, first)).strip("^") or None
    birth = text(general, "age", "dateofbirth")
    birth_date = None
    if birth:
        try:
            birth_date = datetime.strptime(birth, "%Y-%m-%d").date().isoformat()
        except ValueError:
            birth_date = None
    sex_text = text(general, "sex")
    sex = _SEX.get(sex_text.lower(), "unknown") if sex_text else None
    flags = [] if patient_id else ["no_patient_id"]
    return Patient(id=patient_id, name=name, birth_date=birth_date, sex=sex), flags


def _study(root: Element) -> Study:
    acquisition = child(root, "dataacquisition")
    when = None
    if acquisition is not None and acquisition.get("date"):
        stamp = f"{acquisition.get('date')} {acquisition.get('time') or '00:00:00'}"
        try:
            when = datetime.strptime(stamp.strip(), "%Y-%m-%d %H:%M:%S")
        except ValueError:
            when = None
    machine = text(acquisition, "machine")
    document = (text(root, "documentinfo", "documentname") or "").removesuffix(".xml").removesuffix(".XML")
    uid = None
    try:
        uid = uid_from_id(str(uuid.UUID(document))) if document else None
    except ValueError:
        uid = None
    return Study(
        sop_instance_uid=uid,
        acquired_at=when,
        device=f"Philips {machine}" if machine else "Philips",
        placer_order_number=text(root, "orderinfo", "ordernumber"),
    )
