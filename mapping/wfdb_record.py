"""A WFDB record (PTB-XL, PhysioNet/CinC challenge) -> the canonical :class:`~mapping.ecg.Ecg`.

Why: training data and test fixtures come as WFDB, and they must reach the models by
the same rules as a DICOM ECG (lead names, mV, standard order, derived leads), so the
lead assembly is shared with :mod:`mapping.dicom_waveform`.

PTB-XL subsets processed upstream carry units ``zscore`` (band-passed, z-scored per
lead): they are accepted as if mV and flagged ``units:zscore``. Header comments of the
challenge records (``#Sex: Female``) give the patient's sex; the record name goes into
the flags as ``record:NAME`` (study UIDs stay None: a WFDB record has none).

Challenge header dialect: some Georgia (G12EC) headers of the PhysioNet/CinC challenge
write the record line as ``E07938.mat 12 500 5000 05-May-2020 09:49:17`` (the signal
file's name as the record name, the date before the time, month by name), which wfdb
refuses. :func:`standard_record_line` rewrites such a line to standard WFDB
(``E07938 12 500 5000 09:49:17 05/05/2020``) and :func:`read_wfdb_record` reads the
record through it; the product's reader and the training data sets share that rule.

A record as one blob (what ``ecgbridge import`` stores, since the store keeps one blob per
message while a record is a header and its signal files): :func:`pack_wfdb_record` writes
an uncompressed POSIX (ustar) tar whose first member is the ``.hea`` header and whose other
members are the signal files the header names, under their original names, with fixed
metadata (mtime 0, mode 0644, owner 0), so the same record always packs to the same bytes
(its content hash recognises a re-import). ``tar -xf`` unpacks it; :func:`read_wfdb_bytes`
reads it back through :func:`read_wfdb` (unpacked into a temporary folder), and
:func:`looks_like_wfdb_container` recognises it (the ustar magic, a ``.hea`` first member).
A signal file the header names but the container lacks is a :class:`DecodeError` naming it.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import wfdb

from ecgbridge.errors import DecodeError, WaveformError
from ecgbridge.mapping.codes import LEAD_BY_MEANING
from ecgbridge.mapping.dicom_waveform import standardise_leads
from ecgbridge.mapping.ecg import STANDARD_LEADS, Ecg, Patient, Study

__all__ = [
    "read_wfdb",
    "read_wfdb_record",
    "read_wfdb_bytes",
    "pack_wfdb_record",
    "pack_wfdb_members",
    "looks_like_wfdb_container",
    "wfdb_signal_files",
    "standard_record_line",
    "lead_name",
    "WFDB_UNITS_TO_MV",
]

#: WFDB units (lower-cased) -> factor to mV. "zscore" is dimensionless, kept as is.
WFDB_UNITS_TO_MV: dict[str, float] = {
    "mv": 1.0,
    "uv": 1e-3,
    "\u00b5v": 1e-3,
    "\u03bcv": 1e-3,
    "v": 1e3,
    "zscore": 1.0,
}

_LEAD_BY_LOWER: dict[str, str] = {lead.lower(): lead for lead in STANDARD_LEADS}
_SEX = {"male": "male", "m": "male", "female": "female", "f": "female"}
#: A record name written with its signal file's extension (challenge dialect: ``E07938.mat``).
_NAME_WITH_SIGNAL_SUFFIX = re.compile(r"([-\w]+)\.(?:mat|dat)", re.IGNORECASE)
#: A date with the month by name (challenge dialect: ``05-May-2020``).
_DAY_MONTH_NAME_YEAR = re.compile(r"(\d{1,2})-([A-Za-z]{3})-(\d{4})")
#: A signal file name a header may name: a plain file beside it (no folder, never ``..``).
_PLAIN_NAME = re.compile(r"[\w][\w.+-]*")
_TAR_BLOCK = 512
_MONTHS = {m: i for i, m in enumerate(("jan feb mar apr may jun jul aug sep oct nov dec").split(), start=1)}


def lead_name(raw: str) -> str | None:
    """A WFDB signal name as a standard lead ('AVR', 'avr' -> 'aVR'), or None."""
    key = raw.strip().lower()
    return _LEAD_BY_LOWER.get(key) or LEAD_BY_MEANING.get(key)


def standard_record_line(line: str) -> str:
    """The record line in standard WFDB syntax; ``line`` itself unless it is in the challenge dialect.

    The rule: a ``.mat``/``.dat`` suffix on the record name is dropped, and a
    ``DD-Mon-YYYY`` date becomes ``DD/MM/YYYY`` after the time (dropped when there is
    no time, which WFDB requires before a date).
    """
    tokens = line.split()
    if not tokens:
        return line
    named = _NAME_WITH_SIGNAL_SUFFIX.fullmatch(tokens[0])
    fields = tokens[1:]
    dated = [i for i, t in enumerate(fields) if _DAY_MONTH_NAME_YEAR.fullmatch(t)]
    if named is None and not dated:
        return line
    if dated:
        i = dated[0]
        day, month_name, year = _DAY_MONTH_NAME_YEAR.fullmatch(fields[i]).groups()  # type: ignore[union-attr]
        month = _MONTHS.get(month_name.lower())
        if month is None:
            return line  # not the dialect: wfdb says what is wrong
        fields = fields[:i] + fields[i + 1 :]
        if any(":" in t for t in fields):
            fields.append(f"{int(day):02d}/{month:02d}/{year}")
    return " ".join([named.group(1) if named else tokens[0], *fields])


def read_wfdb_record(path: Path | str, *, physical: bool = True) -> wfdb.Record:
    """``wfdb.rdrecord`` of the record at ``path`` (no extension), accepting the challenge header dialect.

    A dialect header is rewritten into a temporary folder beside links to the signal
    files, so wfdb reads the signals unchanged; the record's own files are never modified.
    """
    base = Path(path)
    header = base.with_name(base.name + ".hea")
    lines = header.read_text(encoding="ascii", errors="ignore").splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")), None)
    if first is None or standard_record_line(lines[first]) == lines[first]:
        return wfdb.rdrecord(str(base), physical=physical)
    lines[first] = standard_record_line(lines[first])
    signal_files = {
        line.split()[0]
        for line in lines[first + 1 :]
        if line.strip() and not line.lstrip().startswith("#") and Path(line.split()[0]).name == line.split()[0]
    }
    with tempfile.TemporaryDirectory(prefix="ecgbridge-wfdb-") as tmp:
        (Path(tmp) / header.name).write_text("\n".join(lines) + "\n", encoding="ascii")
        for name in signal_files:
            source = base.parent / name
            if source.is_file():
                _link_or_copy(source.resolve(), Path(tmp) / name)
        return wfdb.rdrecord(str(Path(tmp) / base.name), physical=physical)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.symlink(source, target)
    except OSError:
        shutil.copyfile(source, target)


def read_wfdb(path: Path | str) -> Ecg:
    """Read the record at ``path`` (with or without .hea/.dat/.mat) as an Ecg in mV."""
    base = Path(path)
    if base.suffix.lower() in (".hea", ".dat", ".mat"):
        base = base.with_suffix("")
    header = base.with_name(base.name + ".hea")
    if not header.is_file():
        raise FileNotFoundError(f"no WFDB header {header}")
    try:
        record = read_wfdb_record(base, physical=True)
    except Exception as exc:
        raise DecodeError(f"WFDB record {base.name} could not be read ({type(exc).__name__})", detail=str(exc)) from exc

    name = str(record.record_name or base.name)
    fs = float(record.fs or 0)
    if not np.isfinite(fs) or fs <= 0:
        raise WaveformError(f"WFDB record {name}: sampling frequency must be > 0 (got {fs:g})")
    signal = record.p_signal
    if signal is None or signal.ndim != 2 or signal.shape[0] == 0:
        raise WaveformError(f"WFDB record {name}: no samples")

    flags: list[str] = [f"record:{name}"]
    by_lead: dict[str, np.ndarray] = {}
    dropped: list[str] = []
    zscore = assumed = False
    units = list(record.units or [])
    for column, raw_name in enumerate(record.sig_name or []):
        lead = lead_name(str(raw_name))
        if lead is None:
            dropped.append(re.sub(r"[,\s]+", " ", str(raw_name)).strip() or f"channel {column + 1}")
            continue
        if lead in by_lead:
            raise WaveformError(f"WFDB record {name}: lead {lead} appears twice")
        unit = (str(units[column]) if column < len(units) and units[column] else "").strip()
        if not unit:
            unit, assumed = "mV", True  # the WFDB default when a header names no units
        factor = WFDB_UNITS_TO_MV.get(unit.lower())
        if factor is None:
            raise WaveformError(f"WFDB record {name}: lead {lead} units {unit!r} are not a voltage")
        zscore = zscore or unit.lower() == "zscore"
        values = signal[:, column].astype(np.float64) * factor
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise WaveformError(f"WFDB record {name}: lead {lead} has {bad} NaN/invalid samples")
        by_lead[lead] = values

    signals, leads, lead_flags = standardise_leads(by_lead, dropped)
    if zscore:
        flags.append("units:zscore")
    if assumed:
        flags.append("units_assumed:mV")
    return Ecg(
        signals=signals,
        leads=leads,
        fs=fs,
        patient=Patient(sex=_sex_from_comments(record.comments or [])),
        study=Study(accession_number=None),
        source_format="wfdb",
        units="mV",
        flags=tuple(flags) + lead_flags,
    )


def _sex_from_comments(comments: list[str]) -> str | None:
    """'Sex: Female' (PhysioNet challenge header comment) -> 'female'; None when absent."""
    for line in comments:
        key, sep, value = str(line).lstrip("#").partition(":")
        if sep and key.strip().lower() == "sex":
            return _SEX.get(value.strip().lower(), "unknown")
    return None


# ----- a record as one blob ------------------------------------------------------------------
def wfdb_signal_files(header: bytes | str) -> list[str]:
    """The signal files a WFDB header names, in order, each once.

    ``~`` (a signal with no file) is left out, and so is everything of a multi-segment record
    (its record line names ``NAME/SEGMENTS``; its lines are segment records, not signal files).
    A header that is not WFDB names none (the reader then says what is wrong with it).
    """
    text = header.decode("ascii", errors="ignore") if isinstance(header, bytes) else header
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        return []
    fields = lines[0].split()
    if "/" in fields[0]:
        return []
    try:
        nsig = int(fields[1]) if len(fields) > 1 else 0
    except ValueError:
        return []
    names: list[str] = []
    for line in lines[1 : 1 + max(nsig, 0)]:
        name = line.split()[0]
        if name != "~" and name not in names:
            names.append(name)
    return names


def _plain(name: str) -> bool:
    return _PLAIN_NAME.fullmatch(name) is not None and name not in (".", "..")


def pack_wfdb_members(members: list[tuple[str, bytes]]) -> bytes:
    """``(name, bytes)`` pairs, the header first, as the record's container (see the module docstring)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def pack_wfdb_record(header: Path | str, *, max_bytes: int | None = None) -> bytes:
    """The record whose header is ``header`` (a ``.hea`` file) as one container.

    The signal files the header names are taken from beside it; one that is not there (or is
    not a plain file name, or a symbolic link) is left out, and reading the container then
    says which is missing. Raises :class:`OSError` when a file cannot be read or the record is
    larger than ``max_bytes`` in all.
    """
    path = Path(header)
    text = path.read_bytes()
    members = [(path.name, text)]
    total = len(text)
    for name in wfdb_signal_files(text):
        source = path.parent / name
        if not _plain(name) or name == path.name or source.is_symlink() or not source.is_file():
            continue
        total += source.stat().st_size
        if max_bytes is not None and total > max_bytes:
            raise OSError(f"WFDB record {path.name}: more than {max_bytes} bytes with its signal files: not an ECG")
        members.append((name, source.read_bytes()))
    return pack_wfdb_members(members)


def looks_like_wfdb_container(data: bytes) -> bool:
    """A container :func:`pack_wfdb_record` wrote: ustar magic and a ``.hea`` header first."""
    if len(data) < 2 * _TAR_BLOCK or data[257:262] != b"ustar":
        return False
    first = data[:100].split(b"\0", 1)[0]
    return first.lower().endswith(b".hea") and not data[345:500].strip(b"\0")


def read_wfdb_bytes(data: bytes) -> Ecg:
    """A record's container (:func:`pack_wfdb_record`) -> Ecg, read as :func:`read_wfdb` reads its files."""
    members = _unpack(data)
    header_name = members[0][0]
    record = header_name[: -len(".hea")]
    present = {name for name, _ in members}
    for name in wfdb_signal_files(members[0][1]):
        if not _plain(name):
            raise DecodeError(f"WFDB record {record}: signal file {name!r} is not a file beside the header")
        if name not in present:
            raise DecodeError(
                f"WFDB record {record}: signal file {name} is missing (it must be beside the header {header_name})"
            )
    with tempfile.TemporaryDirectory(prefix="ecgbridge-wfdb-") as tmp:
        (Path(tmp) / f"{record}.hea").write_bytes(members[0][1])  # read_wfdb looks for a lower-case .hea
        for name, content in members[1:]:
            (Path(tmp) / name).write_bytes(content)
        return read_wfdb(Path(tmp) / record)


def _unpack(data: bytes) -> list[tuple[str, bytes]]:
    """The container's members, header first; DecodeError when it is not one."""
    if not looks_like_wfdb_container(data):
        raise DecodeError("not a WFDB record container (a ustar tar with the .hea header first)")
    members: list[tuple[str, bytes]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if not info.isreg() or not _plain(info.name) or any(info.name == n for n, _ in members):
                    raise DecodeError(f"WFDB record container: member {info.name!r} is not a plain file of the record")
                extracted = tar.extractfile(info)
                if extracted is None:  # pragma: no cover - isreg() members always extract
                    raise DecodeError(f"WFDB record container: member {info.name!r} cannot be read")
                members.append((info.name, extracted.read()))
    except (tarfile.TarError, EOFError) as exc:
        raise DecodeError(f"WFDB record container could not be read ({type(exc).__name__})", detail=str(exc)) from exc
    if not members or not members[0][0].lower().endswith(".hea") or len(members[0][0]) <= len(".hea"):
        raise DecodeError("WFDB record container: the first member is not a .hea header")
    return members
