"""ECG global measurements -> FHIR R4 Observations, one per measurement, LOINC-coded (pure).

Input is the ``ModelOutput.extra["measurements"]`` mapping that
:meth:`inference.features.Measurements.as_dict` builds (the same one
:mod:`mapping.hl7_oru` sends as NM OBX), optionally with the extra keys
``qtc_bazett``, ``qtc_fridericia`` and ``rr_interval`` from ``extra["features"]``::

    key              LOINC     display                                      UCUM
    heart_rate       8867-4    Heart rate                                   /min
    rr_interval      8637-1    R-R interval by EKG                          ms
    pr_interval      8625-6    P-R Interval                                 ms
    qrs_duration     8633-0    QRS duration                                 ms
    qt_interval      8634-8    Q-T interval                                 ms
    qtc_interval     8636-3    Q-T interval corrected          + 76635-2    ms
                               (ecgbridge's QTc is Bazett's, so the Bazett
                               code is a second coding of the same value)
    qtc_bazett       76635-2   (the same Observation as qtc_interval; given
                               alone it is coded 8636-3 + 76635-2 as well)
    qtc_fridericia   76634-5   Q-T interval corrected by Fridericia formula ms
    p_axis           8626-4    P wave axis                                  deg
    qrs_axis         8632-2    R wave axis                                  deg
    t_axis           8638-9    T wave axis                                  deg

Decisions:

* **status preliminary, category procedure**, like the model Observations of
  :mod:`mapping.fhir_report`: no clinician has reviewed a machine measurement.
* **identifier** ``urn:ecgbridge:result|<identifier_base>/<key>``: the caller passes the
  report's identifier value plus the measuring software (e.g.
  ``"urn:oid:1.2.3/ecgbridge-measurements/0.1.0"``), so re-delivery of the same ECG
  maps to the same identifiers and a conditional create (``If-None-Exist:
  identifier=...``, :func:`mapping.fhir_report.identifier_query`) is idempotent.
* **no AI security label**: these are deterministic signal measurements, not a model's
  assertion; the "not for clinical use" label goes into ``note`` until cleared.
* Values are rounded to 0.1 (ms, /min, deg); a missing, None, boolean or non-finite value
  is left out; keys this module does not map are ignored (they may be features the
  LVEF model reads). ``qtc_interval`` and ``qtc_bazett`` given with different values
  raise ``ValueError`` (the mapping would otherwise send two QTc values).

Every Observation is validated with ``fhir.resources.R4B`` (via
:func:`mapping.fhir_validate.validate_resource`, which raises
:class:`~ecgbridge.errors.MappingError` on a bad resource).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ecgbridge.mapping.codes import LOINC, SYSTEM
from ecgbridge.mapping.ecg import NOT_FOR_CLINICAL_USE
from ecgbridge.mapping.fhir_observation import observation_base
from ecgbridge.mapping.fhir_validate import validate_resource

__all__ = ["FHIR_MEASUREMENTS", "measurement_observations", "measurement_panel"]

_MS = ("ms", "ms")
_PER_MIN = ("/min", "/min")
_DEG = ("deg", "deg")
_BAZETT = ("76635-2", "Q-T interval corrected by Bazett formula")

#: key -> (LOINC code, display, (UCUM code, unit text)); the order of the Observations.
FHIR_MEASUREMENTS: dict[str, tuple[str, str, tuple[str, str]]] = {
    "heart_rate": (*LOINC["heart_rate"], _PER_MIN),
    "rr_interval": ("8637-1", "R-R interval by EKG", _MS),
    "pr_interval": (*LOINC["pr_interval"], _MS),
    "qrs_duration": (*LOINC["qrs_duration"], _MS),
    "qt_interval": (*LOINC["qt_interval"], _MS),
    "qtc_interval": (*LOINC["qtc_interval"], _MS),
    "qtc_fridericia": ("76634-5", "Q-T interval corrected by Fridericia formula", _MS),
    "p_axis": (*LOINC["p_axis"], _DEG),
    "qrs_axis": (*LOINC["qrs_axis"], _DEG),
    "t_axis": (*LOINC["t_axis"], _DEG),
}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return round(value, 1) if math.isfinite(value) else None


def measurement_observations(
    measurements: Mapping[str, Any],
    *,
    subject: Mapping[str, Any] | None,
    effective: str | None,
    device_ref: str | None,
    identifier_base: str,
    issued: str | None = None,
    label: str = NOT_FOR_CLINICAL_USE,
) -> list[dict[str, Any]]:
    """One validated FHIR R4 Observation (a dict) per mapped measurement.

    ``subject`` is the Reference to the patient (as :mod:`mapping.fhir_report` builds it)
    or None; ``effective`` the acquisition time as a FHIR dateTime; ``device_ref`` the
    reference (``Device/7`` or a bundle ``urn:uuid:``) of the measuring software's Device;
    ``identifier_base`` the stable prefix of every identifier value (see the module doc).
    """
    if not identifier_base:
        raise ValueError("identifier_base is required (it makes re-delivery idempotent)")
    values = _values(measurements)
    out: list[dict[str, Any]] = []
    for key, code, value in _measured(values):
        obs = observation_base(
            identifier_value=f"{identifier_base}/{key}",
            code=code,
            subject=subject,
            effective=effective,
            issued=issued,
        )
        obs["valueQuantity"] = _quantity(key, value)
        obs["method"] = {"text": _METHOD}
        obs["note"] = [{"text": label}]
        if device_ref is not None:
            obs["device"] = {"reference": device_ref}
        out.append(validate_resource(obs))
    return out


def measurement_panel(
    measurements: Mapping[str, Any],
    *,
    subject: Mapping[str, Any] | None,
    effective: str | None,
    device_ref: str | None,
    identifier_base: str,
    issued: str | None = None,
    label: str = NOT_FOR_CLINICAL_USE,
) -> dict[str, Any] | None:
    """The same measurements as one validated Observation with a component each (None: none measured).

    Code LOINC 34534-8 (12 lead EKG panel); each component carries the code and value its own
    Observation would (:func:`measurement_observations`). One resource instead of up to ten:
    a destination configured with ``measurements: panel`` writes a report with a third of the
    requests. Identifier ``<identifier_base>/panel``.
    """
    if not identifier_base:
        raise ValueError("identifier_base is required (it makes re-delivery idempotent)")
    components = [
        {"code": code, "valueQuantity": _quantity(key, value)} for key, code, value in _measured(_values(measurements))
    ]
    if not components:
        return None
    panel_code, panel_display = LOINC["ecg_panel"]
    obs = observation_base(
        identifier_value=f"{identifier_base}/panel",
        code={
            "coding": [{"system": SYSTEM["loinc"], "code": panel_code, "display": panel_display}],
            "text": "ECG measurements",
        },
        subject=subject,
        effective=effective,
        issued=issued,
    )
    obs["note"] = [{"text": label}]
    obs["method"] = {"text": _METHOD}
    if device_ref is not None:
        obs["device"] = {"reference": device_ref}
    obs["component"] = components
    return validate_resource(obs)


_METHOD = "Global measurement on the median beat of all leads (ecgbridge)"


def _values(measurements: Mapping[str, Any]) -> dict[str, float | None]:
    """The mapped keys' values, rounded; QTc from ``qtc_interval`` or ``qtc_bazett`` (which must agree)."""
    values = {key: _number(measurements.get(key)) for key in (*FHIR_MEASUREMENTS, "qtc_bazett")}
    qtc, bazett = values.pop("qtc_interval"), values.pop("qtc_bazett")
    if qtc is not None and bazett is not None and abs(qtc - bazett) > 0.05:
        raise ValueError(f"qtc_interval {qtc} and qtc_bazett {bazett} differ: which QTc is sent?")
    values["qtc_interval"] = qtc if qtc is not None else bazett
    return values


def _measured(values: Mapping[str, float | None]) -> list[tuple[str, dict[str, Any], float]]:
    """(key, CodeableConcept, value) of each measured value, in the order of :data:`FHIR_MEASUREMENTS`."""
    found = []
    for key, (code, display, _unit) in FHIR_MEASUREMENTS.items():
        value = values.get(key)
        if value is None:
            continue
        coding = [{"system": SYSTEM["loinc"], "code": code, "display": display}]
        text = display
        if key == "qtc_interval":
            coding.append({"system": SYSTEM["loinc"], "code": _BAZETT[0], "display": _BAZETT[1]})
            text = "QTc (Bazett)"
        found.append((key, {"coding": coding, "text": text}, value))
    return found


def _quantity(key: str, value: float) -> dict[str, Any]:
    ucum, unit = FHIR_MEASUREMENTS[key][2]
    return {"value": value, "unit": unit, "system": SYSTEM["ucum"], "code": ucum}
