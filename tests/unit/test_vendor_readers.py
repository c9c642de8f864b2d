"""Vendor XML readers: every real sample in ../shared/data, the committed fixtures, MUSE round trip, bad input.

The real samples are HL7 aECG (FDA, CVRG, LIRYC) and Philips Sierra XML 1.03 / 1.04 /
1.04.01. No redistributable GE MUSE file exists, so MUSE is tested against XML this
module builds from a real record (E07506, PhysioNet/CinC 2021) in the publicly
documented MUSE structure.
"""

from __future__ import annotations

import base64
import functools
import re
import time
from pathlib import Path

import numpy as np
import pytest

from ecgbridge.errors import DecodeError, UnsupportedInputError, WaveformError
from ecgbridge.mapping.ecg import STANDARD_LEADS, Ecg
from ecgbridge.mapping.readers import read_ecg_bytes
from ecgbridge.mapping.vendor import aecg, detect_format, looks_like_xml, philips, read_xml
from ecgbridge.mapping.vendor._xml import parse
from ecgbridge.mapping.wfdb_record import read_wfdb
from tests.conftest import FIXTURES, shared_data_dir
from tests.support.peers import needs

VENDOR = FIXTURES / "vendor"
SHARED = shared_data_dir()
SHARED_XML = SHARED / "vendor-xml" if SHARED else None

#: FDA schema examples that hold no analysable ECG, and why (asserted below).
NOT_AN_ECG = {
    "hl7-aecg/fda/empty.xml": "no rhythm waveform",  # an empty AnnotatedECG element
    # The schema's minimum: one lead (II), 13 samples (26 ms). Valid aECG, not an ECG to analyse.
    "hl7-aecg/fda/minimum_aecg.xml": "fewer than 2 usable ECG leads (found 1: II)",
    "hl7-aecg/fda/minimum_aecg_effectiveTime_high.xml": "fewer than 2 usable ECG leads (found 1: II)",
    "hl7-aecg/fda/minimum_aecg_effectiveTime_interval.xml": "fewer than 2 usable ECG leads (found 1: II)",
    "hl7-aecg/fda/minimum_aecg_effectiveTime_low.xml": "fewer than 2 usable ECG leads (found 1: II)",
    "hl7-aecg/fda/minimum_aecg_nouuid.xml": "fewer than 2 usable ECG leads (found 1: II)",
}


def _shared_samples() -> list[str]:
    if SHARED_XML is None or not SHARED_XML.is_dir():
        return []
    return sorted(str(p.relative_to(SHARED_XML)) for p in SHARED_XML.rglob("*") if p.suffix.lower() == ".xml")


SHARED_SAMPLES = _shared_samples()
needs_shared = needs(
    None
    if SHARED_SAMPLES
    else "../shared/data/vendor-xml is absent (set ECGBRIDGE_SHARED_DATA); committed fixtures are tested instead"
)


@functools.cache
def _read(path: str) -> Ecg:
    return read_xml(Path(path).read_bytes())


def _assert_plausible(ecg: Ecg, *, fs: frozenset[float] = frozenset({100.0, 500.0, 1000.0})) -> None:
    assert ecg.leads == STANDARD_LEADS
    assert ecg.fs in fs
    assert 9.5 <= ecg.duration_s <= 11.0
    assert ecg.signals.dtype == np.float32 and np.all(np.isfinite(ecg.signals))
    p2p = np.ptp(ecg.signals, axis=1)
    assert 0.2 < float(np.median(p2p)) < 5.0, p2p  # mV: a QRS is ~0.5-3 mV
    assert float(np.max(np.abs(ecg.signals))) < 50.0  # a uV/mV mix-up would be 1000x off
    if not any(f.startswith("derived_leads") for f in ecg.flags):
        # Einthoven's law holds for real (not derived) limb leads.
        corr = np.corrcoef(ecg.lead("II"), ecg.lead("I") + ecg.lead("III"))[0, 1]
        assert corr > 0.99, corr


# --------------------------------------------------------------- real shared samples


@needs_shared
@pytest.mark.parametrize("name", SHARED_SAMPLES or ["(none)"])
def test_every_shared_sample_reads(name: str) -> None:
    path = str(SHARED_XML / name)  # type: ignore[operator]
    if name in NOT_AN_ECG:
        with pytest.raises(WaveformError, match=re.escape(NOT_AN_ECG[name])):
            _read(path)
        return
    ecg = _read(path)
    _assert_plausible(ecg)
    expected = "philips" if "philips" in name and "converted" not in name else "aecg"
    assert ecg.source_format == expected


@needs_shared
def test_minimum_aecg_is_parsed_but_too_short_to_analyse() -> None:
    root = parse((SHARED_XML / "hl7-aecg/fda/minimum_aecg.xml").read_bytes())  # type: ignore[operator]
    leads = aecg.read_leads(root)
    assert list(leads.by_lead) == ["II"] and leads.fs == pytest.approx(500.0)
    # digits -2 -2 ... with origin 0 uV, scale 2.5 uV
    assert leads.by_lead["II"][:2] == pytest.approx([-0.005, -0.005])
    assert len(leads.by_lead["II"]) == 13


@needs_shared
def test_fda_aecg_identity_and_scaling() -> None:
    ecg = _read(str(SHARED_XML / "hl7-aecg/fda/subject1_0.xml"))  # type: ignore[operator]
    assert ecg.fs == 500.0 and ecg.signals.shape == (12, 5000)
    assert ecg.patient.id == "subject1" and ecg.patient.id_issuer == "2.16.840.1.113883.3.400"
    assert ecg.patient.sex == "male"
    assert ecg.study.device == "Mortara Instrument, Inc. ELI250"
    assert ecg.study.acquired_at is not None and ecg.study.acquired_at.isoformat() == "2002-11-22T09:10:00"
    # First digits of lead I are -2 -2 ..., scale 2.5 uV -> -0.005 mV.
    assert float(ecg.lead("I")[0]) == pytest.approx(-0.005, abs=1e-6)
    # Root + extension identify the document: each file of the study gets its own UID.
    other = _read(str(SHARED_XML / "hl7-aecg/fda/subject1_1.xml"))  # type: ignore[operator]
    assert ecg.study.sop_instance_uid.startswith("2.25.")
    assert ecg.study.sop_instance_uid != other.study.sop_instance_uid


@needs_shared
def test_philips_decoding_matches_the_independent_aecg_conversion() -> None:
    """The same ECG as Philips XLI XML and as an aECG converted by another tool agree."""
    d = SHARED_XML / "philips-sierra"  # type: ignore[operator]
    ours = _read(str(d / "ad4d3d80-d165_1-04_orig.xml"))
    theirs = _read(str(d / "ad4d3d80-d165_1-04_converted.xml"))
    assert "philips_residual_leads:III,aVR,aVL,aVF" in ours.flags
    assert ours.signals.shape == theirs.signals.shape == (12, 5300)
    for lead in STANDARD_LEADS:
        a, b = ours.lead(lead), theirs.lead(lead)
        assert np.corrcoef(a, b)[0, 1] > 0.99, lead
        assert float(np.max(np.abs(a - b))) < 0.03, lead  # mV; the converter filtered slightly


# --------------------------------------------------------------- committed fixtures


def test_fixture_aecg_reads() -> None:
    ecg = read_xml((VENDOR / "liryc_hl7aecg_example.xml").read_bytes())
    _assert_plausible(ecg, fs={100.0})
    assert ecg.source_format == "aecg" and ecg.signals.shape == (12, 1000)
    assert ecg.patient.id == "25060897140"
    assert ecg.study.device and "BeneHeart R12" in ecg.study.device


@pytest.mark.parametrize(
    "name, version, samples",
    [("129DYPRG.XML", "1.03", 5264), ("3191723_ZZDEMOPTONLY_1-04_orig.xml", "1.04", 5300)],
)
def test_fixture_philips_reads(name: str, version: str, samples: int) -> None:
    data = (VENDOR / name).read_bytes()
    ecg = read_xml(data)
    _assert_plausible(ecg, fs={500.0})
    assert ecg.source_format == "philips" and ecg.signals.shape == (12, samples)
    assert f"philips_version:{version}" in ecg.flags
    assert "philips_residual_leads:III,aVR,aVL,aVF" in ecg.flags
    assert any(f.startswith("calibration_trimmed:") for f in ecg.flags)
    assert ecg.patient.sex == "male" and ecg.patient.id
    assert ecg.study.device.startswith("Philips ") and ecg.study.acquired_at is not None
    assert ecg.study.sop_instance_uid and ecg.study.sop_instance_uid.startswith("2.25.")


def test_fixture_philips_utf16_is_sniffed_as_xml() -> None:
    data = (VENDOR / "3191723_ZZDEMOPTONLY_1-04_orig.xml").read_bytes()
    assert data[:2] == b"\xff\xfe"  # UTF-16 LE with BOM, as Philips carts write it
    assert looks_like_xml(data)
    assert detect_format(parse(data)) == "philips"


def test_read_ecg_bytes_dispatches_vendor_xml() -> None:
    ecg = read_ecg_bytes((VENDOR / "129DYPRG.XML").read_bytes(), hint="file")
    assert ecg.source_format == "philips"


def test_read_ecg_bytes_takes_utf16_philips() -> None:
    ecg = read_ecg_bytes((VENDOR / "3191723_ZZDEMOPTONLY_1-04_orig.xml").read_bytes(), hint="file")
    assert ecg.source_format == "philips"


def test_philips_stored_true_leads_are_kept_as_they_are() -> None:
    """A file storing real III/aVR/aVL/aVF (not residuals) must not be 'reconstructed'."""
    xli = read_xml((VENDOR / "129DYPRG.XML").read_bytes())
    counts = np.round(xli.signals / 0.005).astype("<i2")  # back to 5 uV counts
    text = (VENDOR / "129DYPRG.XML").read_text(encoding="utf-8")
    payload = base64.b64encode(counts.tobytes()).decode()
    duration = int(counts.shape[1] * 1000 / 500)
    text = re.sub(
        r"<parsedwaveforms[^>]*>[^<]*</parsedwaveforms>",
        f'<parsedwaveforms compressflag="False" dataencoding="Base64" durationperchannel="{duration}" '
        f'nbitspersample="16">{payload}</parsedwaveforms>',
        text,
    )
    plain = read_xml(text.encode("utf-8"))
    assert not any(f.startswith("philips_residual_leads") for f in plain.flags)
    assert np.max(np.abs(plain.signals - xli.signals)) < 0.0026  # within rounding to 5 uV


# ----------------------------------------------------------------- GE MUSE (generated)


def muse_xml(
    ecg: Ecg,
    *,
    leads: tuple[str, ...] = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6"),
    uv_per_bit: float = 4.88,
    median: bool = True,
    byte_count_delta: int = 0,
) -> bytes:
    """A MUSE-structured RestingECG document (public structure) from an Ecg: our own writer."""

    def lead_data(name: str, samples_mv: np.ndarray) -> str:
        counts = np.round(samples_mv * 1000.0 / uv_per_bit).astype("<i2")
        raw = counts.tobytes()
        encoded = base64.b64encode(raw).decode()
        wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
        return (
            "<LeadData>"
            f"<LeadByteCountTotal>{len(raw) + byte_count_delta}</LeadByteCountTotal>"
            "<LeadTimeOffset>0</LeadTimeOffset>"
            f"<LeadSampleCountTotal>{len(counts)}</LeadSampleCountTotal>"
            f"<LeadAmplitudeUnitsPerBit>{uv_per_bit}</LeadAmplitudeUnitsPerBit>"
            "<LeadAmplitudeUnits>MICROVOLTS</LeadAmplitudeUnits>"
            "<LeadHighLimit>32767</LeadHighLimit><LeadLowLimit>-32768</LeadLowLimit>"
            f"<LeadID>{name}</LeadID>"
            "<LeadOffsetFirstSample>0</LeadOffsetFirstSample><FirstSampleBaseline>0</FirstSampleBaseline>"
            "<LeadSampleSize>2</LeadSampleSize><LeadOff>FALSE</LeadOff><BaselineSway>FALSE</BaselineSway>"
            f"<WaveFormData>{wrapped}</WaveFormData>"
            "</LeadData>"
        )

    def waveform(kind: str, n: int) -> str:
        body = "".join(lead_data(name, ecg.lead(name)[:n]) for name in leads)
        return (
            f"<Waveform><WaveformType>{kind}</WaveformType><WaveformStartTime>0</WaveformStartTime>"
            f"<NumberofLeads>{len(leads)}</NumberofLeads><SampleType>CONTINUOUS_SAMPLES</SampleType>"
            f"<SampleBase>{int(ecg.fs)}</SampleBase><SampleExponent>0</SampleExponent>"
            "<HighPassFilter>16</HighPassFilter><LowPassFilter>150</LowPassFilter><ACFilter>60</ACFilter>"
            f"{body}</Waveform>"
        )

    median_part = waveform("Median", int(1.2 * ecg.fs)) if median else ""
    doc = (
        '<?xml version="1.0" encoding="ISO-8859-1"?>\n'
        '<!DOCTYPE RestingECG SYSTEM "restecg.dtd">\n'
        "<RestingECG><MuseInfo><MuseVersion>9.0.0</MuseVersion></MuseInfo>"
        "<PatientDemographics><PatientID>CINC2021-E07506</PatientID><PatientAge>66</PatientAge>"
        "<AgeUnits>YEARS</AgeUnits><DateofBirth>03-14-1950</DateofBirth><Gender>FEMALE</Gender>"
        "<PatientLastName>M\xfcller</PatientLastName><PatientFirstName>Test</PatientFirstName></PatientDemographics>"
        "<TestDemographics><DataType>RESTING</DataType><AcquisitionDevice>MAC55</AcquisitionDevice>"
        "<AcquisitionTime>10:34:12</AcquisitionTime><AcquisitionDate>03-14-2016</AcquisitionDate></TestDemographics>"
        f"{median_part}{waveform('Rhythm', ecg.signals.shape[1])}</RestingECG>"
    )
    return doc.encode("iso-8859-1")


@pytest.fixture(scope="module")
def e07506() -> Ecg:
    return read_wfdb(FIXTURES / "wfdb" / "E07506.hea")


def test_muse_generated_round_trip(e07506: Ecg) -> None:
    ecg = read_xml(muse_xml(e07506))
    assert ecg.source_format == "muse"
    assert ecg.leads == STANDARD_LEADS and ecg.fs == 500.0 and ecg.signals.shape == (12, 5000)
    assert "derived_leads:III,aVR,aVL,aVF" in ecg.flags
    for lead in ("I", "II", "V1", "V6"):
        assert np.max(np.abs(ecg.lead(lead) - e07506.lead(lead))) <= 4.88e-3 / 2 + 1e-6
    assert np.max(np.abs(ecg.lead("III") - (e07506.lead("II") - e07506.lead("I")))) < 0.01
    assert ecg.patient.id == "CINC2021-E07506" and ecg.patient.sex == "female"
    assert ecg.patient.birth_date == "1950-03-14" and ecg.patient.name == "M\u00fcller^Test"
    assert ecg.study.acquired_at.isoformat() == "2016-03-14T10:34:12"
    assert ecg.study.device == "GE MAC55"
    _assert_plausible(ecg, fs={500.0})


def test_muse_median_only_is_refused(e07506: Ecg) -> None:
    doc = muse_xml(e07506, median=True).replace(b"<WaveformType>Rhythm", b"<WaveformType>Median")
    with pytest.raises(WaveformError, match="no rhythm waveform: MUSE WaveformType is median, median"):
        read_xml(doc)


def test_muse_byte_count_mismatch_is_named(e07506: Ecg) -> None:
    with pytest.raises(WaveformError, match="MUSE lead I: LeadByteCountTotal is 10001 but WaveFormData holds 10000"):
        read_xml(muse_xml(e07506, byte_count_delta=1, median=False))


def test_muse_lead_lengths_disagree(e07506: Ecg) -> None:
    doc = muse_xml(e07506, median=False).decode("iso-8859-1")
    # Cut lead V6 to 4999 samples (consistently, so only the cross-lead check fails).
    start = doc.index("<LeadID>V6</LeadID>")
    block_start = doc.rindex("<LeadData>", 0, start)
    block_end = doc.index("</LeadData>", start)
    short = e07506.lead("V6")[:4999]
    counts = np.round(short * 1000.0 / 4.88).astype("<i2").tobytes()
    block = (
        f"<LeadData><LeadByteCountTotal>{len(counts)}</LeadByteCountTotal>"
        f"<LeadSampleCountTotal>4999</LeadSampleCountTotal><LeadAmplitudeUnitsPerBit>4.88"
        f"</LeadAmplitudeUnitsPerBit><LeadAmplitudeUnits>MICROVOLTS</LeadAmplitudeUnits>"
        f"<LeadID>V6</LeadID><LeadSampleSize>2</LeadSampleSize>"
        f"<WaveFormData>{base64.b64encode(counts).decode()}</WaveFormData>"
    )
    doc = doc[:block_start] + block + doc[block_end:]
    with pytest.raises(WaveformError, match="lead lengths disagree .*V6 4999"):
        read_xml(doc.encode("iso-8859-1"))


# ----------------------------------------------------------------------- bad input


def test_broken_xml_is_a_decode_error() -> None:
    data = (VENDOR / "129DYPRG.XML").read_bytes()[:20000]
    with pytest.raises(DecodeError, match="not well-formed XML"):
        read_xml(data)
    with pytest.raises(DecodeError, match="empty input"):
        read_xml(b"")


def test_entity_declarations_are_refused() -> None:
    bomb = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;">]><x>&b;</x>'
    with pytest.raises(DecodeError, match="entities"):
        read_xml(bomb)


def test_unknown_root_is_unsupported_and_named() -> None:
    with pytest.raises(UnsupportedInputError, match=r"root element <CardiologyXML> \(namespace none\)"):
        read_xml(b"<?xml version='1.0'?><CardiologyXML><x/></CardiologyXML>")
    with pytest.raises(UnsupportedInputError, match=r"<AnnotatedECG> \(namespace urn:example\)"):
        read_xml(b"<AnnotatedECG xmlns='urn:example'/>")


def _aecg_fixture() -> str:
    return (VENDOR / "liryc_hl7aecg_example.xml").read_text(encoding="utf-8")


def test_aecg_with_only_a_representative_beat_is_refused() -> None:
    doc = _aecg_fixture().replace('<code code="RHYTHM"', '<code code="REPRESENTATIVE_BEAT"', 1)
    with pytest.raises(WaveformError, match="no rhythm waveform: the aECG series are REPRESENTATIVE_BEAT"):
        read_xml(doc.encode())


def test_aecg_lead_lengths_disagree_is_named() -> None:
    doc = _aecg_fixture()
    start = doc.index('code="MDC_ECG_LEAD_V2"')
    digits = doc.index("<digits>", start) + len("<digits>")
    doc = doc[:digits] + "1 2 3 " + doc[digits:]
    with pytest.raises(WaveformError, match=r"lead lengths disagree .*V1 1000, V2 1003"):
        read_xml(doc.encode())


def test_aecg_units_are_applied() -> None:
    base = read_xml(_aecg_fixture().encode())
    doc = _aecg_fixture().replace('<scale value="5" unit="uV">', '<scale value="0.005" unit="mV">')
    assert np.allclose(read_xml(doc.encode()).signals, base.signals)
    bad = _aecg_fixture().replace('<scale value="5" unit="uV">', '<scale value="5" unit="mmHg">', 1)
    with pytest.raises(WaveformError, match="lead I: scale unit 'mmHg' is not a voltage unit"):
        read_xml(bad.encode())


def test_aecg_without_sampling_increment_is_refused() -> None:
    doc = re.sub(r"<increment [^>]*></increment>", "", _aecg_fixture(), count=1)
    with pytest.raises(WaveformError, match="no increment"):
        read_xml(doc.encode())


def test_philips_unsupported_version_is_named() -> None:
    data = (VENDOR / "129DYPRG.XML").read_bytes().replace(b"<documentversion>1.03<", b"<documentversion>2.00<")
    with pytest.raises(UnsupportedInputError, match="Philips document SierraECG 2.00 is not supported"):
        read_xml(data)


def test_philips_corrupt_xli_fails_fast() -> None:
    text = (VENDOR / "129DYPRG.XML").read_text(encoding="utf-8")
    # A chunk header declaring a negative size would make a naive decoder loop forever.
    evil = base64.b64encode(b"\xf8\xff\xff\xff\x00\x00\x00\x00" * 4).decode()
    doc = re.sub(r"(<parsedwaveforms[^>]*>)[^<]*(</parsedwaveforms>)", rf"\g<1>{evil}\g<2>", text)
    started = time.monotonic()
    with pytest.raises(DecodeError, match="XLI data is corrupt or truncated: lead 1 declares -8 bytes"):
        read_xml(doc.encode())
    assert time.monotonic() - started < 1.0
    # Cut in the middle of the compressed data: a decode error, not a crash.
    root = parse(text.encode())
    waves = next(root.iter(f"{{{philips.NAMESPACE}}}parsedwaveforms"))
    payload = base64.b64decode("".join((waves.text or "").split()))
    cut = base64.b64encode(payload[: len(payload) // 3]).decode()
    doc = re.sub(r"(<parsedwaveforms[^>]*>)[^<]*(</parsedwaveforms>)", rf"\g<1>{cut}\g<2>", text)
    with pytest.raises((DecodeError, WaveformError), match="XLI|Philips"):
        read_xml(doc.encode())
