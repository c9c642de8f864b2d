"""Seed inputs the fuzzers mutate: small, valid files of every inbound format.

Why small: a mutation of a 100 kB file nearly always lands in sample data, which every
reader takes as numbers; a 2-5 kB file with the same structure puts most mutations in
headers, tags and attributes, where the parsers make decisions, and reads 5-50x faster.
The DICOM, HL7, MUSE and Philips seeds hold the first 0.12 s of the committed real
recording E07506 (PhysioNet/CinC 2021), written by the test writers or, for MUSE and
Philips (no writer elsewhere; XLI by :func:`xli_encode`), here; the aECG seed is the
committed LIRYC file with its sample lists cut. Whole real files are mutated too, less often.
"""

from __future__ import annotations

import base64
import functools
import io
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom.uid import ImplicitVRLittleEndian

from ecgbridge.mapping.ecg import Ecg, Patient, Study
from ecgbridge.mapping.hl7_common import python_codec

__all__ = [
    "FIXTURES",
    "small_ecg",
    "dicom_seeds",
    "dicom_fixture",
    "hl7_seeds",
    "xml_seeds",
    "xml_fixtures",
    "xli_seed",
    "xli_encode",
    "hostile_xml",
]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
_WHEN = datetime(2021, 3, 14, 10, 34, 12, tzinfo=UTC)
_SAMPLES = 60  # 0.12 s at 500 Hz: every structure of a real file, few sample bytes


@functools.cache
def small_ecg() -> Ecg:
    """The first samples of the real 12-lead record E07506 (500 Hz, mV)."""
    from ecgbridge.mapping.wfdb_record import read_wfdb

    ecg = read_wfdb(FIXTURES / "wfdb" / "E07506.hea")
    return replace(
        ecg,
        signals=np.ascontiguousarray(ecg.signals[:, :_SAMPLES]),
        patient=Patient(
            id="FUZZ-0001", id_issuer="HOSP", name="M\u00fcller^Zo\u00eb", birth_date="1955-03-14", sex="female"
        ),
        study=Study(acquired_at=_WHEN, placer_order_number="PL1001", device="Fuzz Cart"),
    )


# ----------------------------------------------------------------------------- DICOM


@functools.cache
def dicom_seeds() -> tuple[bytes, ...]:
    """Small DICOM ECGs: 12 leads + median beat, 8 leads in Implicit VR, and a bare data set."""
    from tests.support.dicom_writer import dataset_to_bytes, ecg_to_dataset

    ecg = small_ecg()
    full = dataset_to_bytes(ecg_to_dataset(ecg, include_median=True, strict=False))
    eight = ecg_to_dataset(ecg, leads=("I", "II", "V1", "V2", "V3", "V4", "V5", "V6"), units="mV", sensitivity=0.005)
    eight.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit = dataset_to_bytes(eight)
    bare = _bare_dataset(full)
    return full, implicit, bare


def _bare_dataset(data: bytes) -> bytes:
    """The data set of a DICOM file without preamble and file meta (what read_bytes(force=True) takes)."""
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = pydicom.dcmread(io.BytesIO(data))
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return out.getvalue()


@functools.cache
def dicom_fixture() -> bytes:
    """A whole committed DICOM fixture (141 kB: rhythm, median beat, real mV)."""
    return (FIXTURES / "dicom" / "cinc2021_E07506_12lead.dcm").read_bytes()


# ------------------------------------------------------------------------------- HL7


@functools.cache
def hl7_seeds() -> tuple[bytes, ...]:
    """ORU^R01 (NA, MA in 8859/1, v2.3, enhanced mode, ED with DICOM and with XML), ORM, ADT."""
    from tests.support.hl7_waveform_writer import build_oru_ed, build_oru_waveform

    ecg = small_ecg()
    ecg8 = replace(ecg, signals=ecg.signals[[0, 1, 6, 7, 8, 9, 10, 11], :30], leads=_EIGHT)
    na = build_oru_waveform(ecg, control_id="FZ0001", placer_order_number="PL1001", sent_at=_WHEN)
    ma = build_oru_waveform(ecg8, control_id="FZ0002", form="MA", encoding="8859/1", sent_at=_WHEN)
    v23 = build_oru_waveform(ecg8, control_id="FZ0003", version="2.3", sent_at=_WHEN, sensitivity_uv=2.5)
    enhanced = build_oru_waveform(
        ecg8, control_id="FZ0004", accept_ack_type="ER", application_ack_type="NE", sent_at=_WHEN
    )
    ed_dicom = build_oru_ed(dicom_seeds()[2], "DICOM", control_id="FZ0005", patient=ecg.patient, sent_at=_WHEN)
    ed_xml = build_oru_ed(xml_seeds()[0], "XML", control_id="FZ0006", patient=ecg.patient, sent_at=_WHEN)
    messages = [na, ma, v23, enhanced, ed_dicom, ed_xml, _ORM, _ADT]
    return tuple(m.encode(_codec(m)) for m in messages)


_EIGHT = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")

_ORM = (
    "MSH|^~\\&|HIS^1.2.840.1^ISO|HOSP|ECGBRIDGE|CARDIO|20260301101500+0100||ORM^O01^ORM_O01|ORM0001|P|2.5.1\r"
    "PID|1||MRN55501^^^HOSP^MR~X99^^^OTHER||M\u00fcller^Zo\u00eb||19600101|F\r"
    "PV1|1|O|CARD^101^1||||||||||||||||VN7788^^^HOSP^VN\r"
    "ORC|NW|PL1001^HIS|FI2002^ECG|GRP9^HIS|SC||||20260301100000|||1234^Smith^John\r"
    "OBR|1|PL1001^HIS|FI2002^ECG|93000^EKG 12 lead^CPT|||20260301100500\r"
)
_ADT = (
    "MSH|^~\\&|ADT|HOSP|ECGBRIDGE|CARDIO|20260301101500||ADT^A01^ADT_A01|ADT0001|P|2.4|||AL|NE||8859/1\r"
    "EVN|A01|20260301101500\r"
    "PID|1||MRN55501^^^HOSP^MR||M\u00fcller^Zo\u00eb||19600101|F\r"
    "PV1|1|I|CARD^101^1\r"
)


def _codec(message: str) -> str:
    msh = message.split("\r", 1)[0].split("|")
    return python_codec(msh[17]) if len(msh) > 17 and msh[17] else "utf-8"


# ------------------------------------------------------------------------ vendor XML


@functools.cache
def xml_seeds() -> tuple[bytes, ...]:
    """MUSE (generated), aECG (the fixture cut to a few samples), Philips uncompressed and XLI."""
    return _muse(small_ecg()), _short_aecg(), _philips(small_ecg(), xli=False), _philips(small_ecg(), xli=True)


@functools.cache
def xml_fixtures() -> tuple[bytes, ...]:
    """The committed vendor files: Philips 1.03 (UTF-8), 1.04 (UTF-16) and the aECG."""
    names = ("129DYPRG.XML", "3191723_ZZDEMOPTONLY_1-04_orig.xml", "liryc_hl7aecg_example.xml")
    return tuple((FIXTURES / "vendor" / name).read_bytes() for name in names)


def _muse(ecg: Ecg) -> bytes:
    """A MUSE-structured RestingECG (the public structure) with a Median and a Rhythm waveform."""

    def lead(name: str, n: int) -> str:
        counts = np.round(ecg.lead(name)[:n] * 1000.0 / 4.88).astype("<i2").tobytes()
        return (
            f"<LeadData><LeadByteCountTotal>{len(counts)}</LeadByteCountTotal>"
            f"<LeadSampleCountTotal>{len(counts) // 2}</LeadSampleCountTotal>"
            "<LeadAmplitudeUnitsPerBit>4.88</LeadAmplitudeUnitsPerBit><LeadAmplitudeUnits>MICROVOLTS</LeadAmplitudeUnits>"
            f"<LeadID>{name}</LeadID><LeadSampleSize>2</LeadSampleSize>"
            f"<WaveFormData>{base64.b64encode(counts).decode()}</WaveFormData></LeadData>"
        )

    def waveform(kind: str, n: int) -> str:
        return (
            f"<Waveform><WaveformType>{kind}</WaveformType><SampleBase>{int(ecg.fs)}</SampleBase>"
            f"<SampleExponent>0</SampleExponent>{''.join(lead(name, n) for name in _EIGHT)}</Waveform>"
        )

    doc = (
        '<?xml version="1.0" encoding="ISO-8859-1"?>\n<!DOCTYPE RestingECG SYSTEM "restecg.dtd">\n'
        "<RestingECG><PatientDemographics><PatientID>FUZZ-0001</PatientID><DateofBirth>03-14-1955</DateofBirth>"
        "<Gender>FEMALE</Gender><PatientLastName>M\xfcller</PatientLastName><PatientFirstName>Zo\xeb</PatientFirstName>"
        "</PatientDemographics><TestDemographics><AcquisitionDevice>MAC55</AcquisitionDevice>"
        "<AcquisitionTime>10:34:12</AcquisitionTime><AcquisitionDate>03-14-2021</AcquisitionDate></TestDemographics>"
        f"{waveform('Median', 20)}{waveform('Rhythm', ecg.signals.shape[1])}</RestingECG>"
    )
    return doc.encode("iso-8859-1")


def _short_aecg() -> bytes:
    """The aECG fixture with every digits list cut to its first 40 values (same structure)."""
    import re

    text = (FIXTURES / "vendor" / "liryc_hl7aecg_example.xml").read_text(encoding="utf-8")

    def cut(match: re.Match[str]) -> str:
        return match.group(1) + " ".join(match.group(2).split()[:40]) + match.group(3)

    return re.sub(r"(<digits>)([^<]*)(</digits>)", cut, text).encode("utf-8")


def xli_encode(leads: list[np.ndarray]) -> bytes:
    """Philips XLI: per lead an 8-byte header and 10-bit LZW codes of the second-difference deltas.

    The inverse of sierraecg's ``xli_decode_deltas`` and ``LzwDecoder`` (literal codes
    only, which every LZW decoder reads), so that a small XLI file can be made here.
    """
    out = bytearray()
    for samples in leads:
        s = [int(v) for v in samples]
        raw = [s[0], s[1]] + [2 * s[i - 1] - s[i - 2] - s[i] + 64 for i in range(3, len(s))] + [0]
        first = 2 * s[1] - s[0] - s[2]
        values = np.asarray(raw, dtype=np.int16).view(np.uint16)
        packed = bytes((values >> 8).astype(np.uint8)) + bytes((values & 0xFF).astype(np.uint8))
        bits = "".join(f"{byte:010b}" for byte in packed)
        bits += "0" * (-len(bits) % 8)
        codes = int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b""
        out += len(codes).to_bytes(4, "little") + b"\x00\x00" + first.to_bytes(2, "little", signed=True) + codes
    return bytes(out)


def _philips(ecg: Ecg, *, xli: bool) -> bytes:
    """A minimal Philips Sierra 1.04 document (UTF-8) holding ``ecg`` in counts of 5 uV."""
    counts = [np.round(ecg.lead(name) * 200.0).astype(np.int64) for name in ecg.leads]
    n = len(counts[0])
    if xli:
        payload, attrs = xli_encode(counts), 'compressflag="True" compressmethod="XLI"'
    else:
        payload = np.stack(counts).astype("<i2").tobytes()
        attrs = 'compressflag="False" compressmethod="NONE"'
    duration = n * 1000 // int(ecg.fs)
    doc = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<restingecgdata xmlns="http://www3.medical.philips.com">'
        "<documentinfo><documentname>03d494f2-94f2-13d4-857f-00095c028bdc.xml</documentname>"
        "<documenttype>SierraECG</documenttype><documentversion>1.04</documentversion></documentinfo>"
        '<dataacquisition date="2021-03-14" time="10:34:12"><machine>PageWriter</machine>'
        "<signalcharacteristics><samplingrate>500</samplingrate><signalresolution>5</signalresolution>"
        "<acquisitiontype>STD-12</acquisitiontype><bitspersample>16</bitspersample><signaloffset>0</signaloffset>"
        "<numberchannelsvalid>12</numberchannelsvalid></signalcharacteristics></dataacquisition>"
        "<patient><generalpatientdata><patientid>FUZZ-0001</patientid><name><lastname>M\u00fcller</lastname>"
        "<firstname>Zo\u00eb</firstname></name><age><dateofbirth>1955-03-14</dateofbirth></age><sex>Female</sex>"
        "</generalpatientdata></patient>"
        f'<waveforms><parsedwaveforms {attrs} dataencoding="Base64" durationperchannel="{duration}" '
        f'nbitspersample="16" numberofleads="12" leadlabels="{" ".join(ecg.leads)}">'
        f"{base64.b64encode(payload).decode()}</parsedwaveforms></waveforms></restingecgdata>"
    )
    return doc.encode("utf-8")


@functools.cache
def xli_seed() -> tuple[bytes, int]:
    """The XLI payload of the small Philips seed and its samples per lead (for xli_decode alone)."""
    ecg = small_ecg()
    return xli_encode([np.round(ecg.lead(name) * 200.0).astype(np.int64) for name in ecg.leads]), ecg.signals.shape[1]


# ------------------------------------------------------------- hostile XML (explicit)


def hostile_xml(marker_file: Path) -> dict[str, bytes]:
    """Documents that must be refused before any expansion or read: entity bombs, external entities.

    ``marker_file`` is the local file the external-entity documents point at; a reader
    that resolved them would read it.
    """
    uri = marker_file.resolve().as_uri()
    lol = "".join(f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10}">' for i in range(1, 10))
    return {
        "billion_laughs": (
            f'<?xml version="1.0"?><!DOCTYPE RestingECG [<!ENTITY lol0 "lol">{lol}]><RestingECG>&lol9;</RestingECG>'
        ).encode(),
        "billion_laughs_aecg_utf16": (
            f'<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE AnnotatedECG [<!ENTITY lol0 "lol">{lol}]>'
            f'<AnnotatedECG xmlns="urn:hl7-org:v3"><id root="&lol9;"/></AnnotatedECG>'
        ).encode("utf-16"),
        "quadratic_blowup": (
            f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "{"x" * 50_000}">]>'
            f"<restingecgdata>{'&a;' * 5_000}</restingecgdata>"
        ).encode(),
        "external_entity_file": (
            f'<?xml version="1.0"?><!DOCTYPE RestingECG [<!ENTITY xxe SYSTEM "{uri}">]>'
            "<RestingECG><PatientDemographics><PatientID>&xxe;</PatientID></PatientDemographics></RestingECG>"
        ).encode(),
        "external_parameter_entity": (
            f'<?xml version="1.0"?><!DOCTYPE restingecgdata [<!ENTITY % ext SYSTEM "{uri}"> %ext;]>'
            '<restingecgdata xmlns="http://www3.medical.philips.com"/>'
        ).encode(),
        "external_entity_in_attribute": (
            f'<?xml version="1.0"?><!DOCTYPE AnnotatedECG [<!ENTITY xxe SYSTEM "{uri}">]>'
            '<AnnotatedECG xmlns="urn:hl7-org:v3"><id root="&xxe;"/></AnnotatedECG>'
        ).encode(),
        "external_entity_unparsed": (
            f'<?xml version="1.0"?><!DOCTYPE RestingECG [<!NOTATION n SYSTEM "x">'
            f'<!ENTITY xxe SYSTEM "{uri}" NDATA n>]><RestingECG/>'
        ).encode(),
    }
