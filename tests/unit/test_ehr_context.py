"""EHR resources -> EhrContext: code tables, unit conversions, the window and statuses (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ecgbridge.mapping.ehr_context import (
    EHR_CONDITION_ICD10,
    EHR_CONDITION_NAMES,
    EHR_CONDITION_SNOMED,
    EHR_MEDICATION_ATC,
    EHR_MEDICATION_NAMES,
    EHR_MEDICATION_RXNORM,
    EHR_UNIT_FACTORS,
    EHR_VALUE_LOINC,
    EHR_VALUE_NAMES,
    ICD10_SYSTEMS,
    LOINC,
    SNOMED,
    EhrContext,
    age_at,
    condition_flags,
    condition_history,
    context_from_resources,
    convert_unit,
    latest_values,
    medication_classes,
    medication_use,
    observation_loinc_codes,
    parse_fhir_datetime,
)

ECG = datetime(2025, 3, 10, 9, 30, tzinfo=UTC)


def at(**delta: float) -> str:
    return (ECG + timedelta(**delta)).isoformat().replace("+00:00", "Z")


def obs(
    code: str,
    value: float | None,
    unit: str | None,
    when: str | None,
    status: str = "final",
    rid: str = "o1",
    **extra: Any,
) -> dict[str, Any]:
    o: dict[str, Any] = {
        "resourceType": "Observation",
        "id": rid,
        "status": status,
        "code": {"coding": [{"system": LOINC, "code": code}]},
        **extra,
    }
    if when:
        o["effectiveDateTime"] = when
    if value is not None:
        o["valueQuantity"] = {
            "value": value,
            **({"unit": unit, "system": "http://unitsofmeasure.org", "code": unit} if unit else {}),
        }
    return o


def values(observations: list[dict[str, Any]], window: int = 365) -> dict[str, float]:
    return {k: v.value for k, v in latest_values(observations, reference_time=ECG, window_days=window).items()}


# ----- tables ---------------------------------------------------------------------


def test_tables_cover_every_contract_name_once() -> None:
    assert set(EHR_VALUE_LOINC) == set(EHR_VALUE_NAMES) == set(EHR_UNIT_FACTORS)
    codes = [c for cs in EHR_VALUE_LOINC.values() for c in cs]
    assert len(codes) == len(set(codes)), "a LOINC code maps to two variables"
    assert "85354-9" in observation_loinc_codes() and len(observation_loinc_codes()) == len(codes) + 2
    for name, unit in EHR_VALUE_NAMES.items():
        assert convert_unit(name, 1.0, unit) == 1.0, f"{name}: canonical unit {unit} is not the identity"
    assert set(EHR_CONDITION_SNOMED) == set(EHR_CONDITION_ICD10) == set(EHR_CONDITION_NAMES)
    assert set(EHR_MEDICATION_RXNORM) == set(EHR_MEDICATION_ATC) == set(EHR_MEDICATION_NAMES)


@pytest.mark.parametrize(
    "name, value, unit, expected",
    [
        ("creatinine", 88.42, "umol/L", 1.0),
        ("creatinine", 88.42, "µmol/L", 1.0),
        ("creatinine", 0.1768, "mmol/L", 2.0),
        ("hemoglobin", 135, "g/L", 13.5),
        ("hemoglobin", 8.0, "mmol/L", 12.89),
        ("troponin", 0.014, "ng/mL", 14.0),
        ("troponin", 0.014, "ug/L", 14.0),
        ("troponin", 14, "pg/mL", 14.0),
        ("bnp", 250, "ng/L", 250.0),
        ("nt_probnp", 100, "pmol/L", 845.7),
        ("potassium", 4.2, "meq/L", 4.2),
        ("weight", 220, "[lb_av]", 99.79),
        ("height", 70, "[in_i]", 177.8),
        ("height", 1.8, "m", 180.0),
        ("systolic_bp", 120, "mmHg", 120.0),
        ("heart_rate", 72, "{beats}/min", 72.0),
        ("egfr", 58, "mL/min/1.73m2", 58.0),
    ],
)
def test_unit_conversions(name: str, value: float, unit: str, expected: float) -> None:
    assert convert_unit(name, value, unit) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize(
    "name, unit",
    [("creatinine", "furlongs"), ("egfr", "mL/min"), ("weight", "%"), ("troponin", None), ("sodium", "mg/dL")],
)
def test_units_that_do_not_convert(name: str, unit: str | None) -> None:
    assert convert_unit(name, 1.0, unit) is None


def test_unconvertible_values_are_ignored_and_reported_never_mixed() -> None:
    ctx = context_from_resources(
        {"resourceType": "Patient", "id": "p"},
        [
            obs("2160-0", 1.2, "mg/dL", at(days=-10), rid="a"),
            obs("2160-0", 3.0, "furlongs", at(days=-1), rid="b"),
            obs("2160-0", 4.0, "furlongs", at(days=-2), rid="c"),
        ],
        [],
        [],
        acquired_at=ECG,
        window_days=365,
        source="ehr",
    )
    assert ctx.values["creatinine"].value == 1.2 and ctx.values["creatinine"].reference == "Observation/a"
    assert ctx.problems == ("creatinine: unit 'furlongs' not convertible to mg/dL, 2 values ignored",)


# ----- window and statuses --------------------------------------------------------


def test_latest_inside_the_window_before_the_ecg_wins() -> None:
    got = values(
        [
            obs("2823-3", 3.9, "mmol/L", at(days=-20)),
            obs("2823-3", 4.4, "mmol/L", at(days=-2)),
            obs("2823-3", 5.9, "mmol/L", at(hours=2)),  # after the ECG
            obs("2951-2", 139, "mmol/L", at(days=-400)),
        ]
    )  # outside the window
    assert got == {"potassium": 4.4}
    assert values([obs("2951-2", 139, "mmol/L", at(days=-400))], window=500) == {"sodium": 139}


@pytest.mark.parametrize(
    "status, used",
    [
        ("final", True),
        ("amended", True),
        ("corrected", True),
        ("preliminary", True),
        ("entered-in-error", False),
        ("cancelled", False),
        ("registered", False),
    ],
)
def test_observation_status(status: str, used: bool) -> None:
    assert bool(values([obs("718-7", 13.1, "g/dL", at(days=-1), status=status)])) is used


def test_value_quantity_only_time_needed_and_components_read() -> None:
    coded_string = obs("2823-3", None, None, at(days=-1), valueString="4.1")
    no_time = obs("8867-4", 70, "/min", None)
    panel = obs(
        "85354-9",
        None,
        None,
        at(hours=-1),
        component=[
            {
                "code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                "valueQuantity": {"value": 131, "unit": "mm[Hg]"},
            },
            {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]}, "valueQuantity": {"value": 79, "unit": "mmHg"}},
        ],
    )
    ctx = context_from_resources(
        {"resourceType": "Patient", "id": "p"},
        [coded_string, no_time, panel],
        None,
        None,
        acquired_at=ECG,
        window_days=365,
        source=None,
    )
    assert {k: v.value for k, v in ctx.values.items()} == {"systolic_bp": 131, "diastolic_bp": 79}
    assert ctx.problems == ("heart_rate: 1 value without an effective time ignored",)
    assert ctx.conditions == {} and ctx.medications == {}  # not asked: not known


def test_other_code_systems_and_period_and_comparator() -> None:
    wrong_system = {
        **obs("2823-3", 4.0, "mmol/L", at(days=-1)),
        "code": {"coding": [{"system": "urn:local", "code": "2823-3"}]},
    }
    period = obs("8867-4", 64, "/min", None, effectivePeriod={"start": at(hours=-2), "end": at(hours=-1)})
    censored = obs("89579-7", 3, "ng/L", at(hours=-1))
    censored["valueQuantity"]["comparator"] = "<"
    ctx = context_from_resources(
        {"resourceType": "Patient", "id": "p"},
        [wrong_system, period, censored],
        [],
        [],
        acquired_at=ECG,
        window_days=365,
        source=None,
    )
    assert {k: v.value for k, v in ctx.values.items()} == {"troponin": 3, "heart_rate": 64}
    assert ctx.problems == ("troponin: latest value carries a comparator (< or >) and is taken at its bound",)


def test_converted_values_keep_their_source_unit() -> None:
    v = latest_values([obs("29463-7", 150, "[lb_av]", at(days=-1))], reference_time=ECG, window_days=30)["weight"]
    assert (v.unit, v.source_unit, v.loinc) == ("kg", "[lb_av]", "29463-7")
    assert v.value == pytest.approx(68.04, abs=0.01)


# ----- conditions -----------------------------------------------------------------


def cond(
    system: str, code: str, clinical: str | None = "active", verification: str | None = None, onset: str | None = None
) -> dict[str, Any]:
    c: dict[str, Any] = {"resourceType": "Condition", "code": {"coding": [{"system": system, "code": code}]}}
    if clinical:
        c["clinicalStatus"] = {"coding": [{"code": clinical}]}
    if verification:
        c["verificationStatus"] = {"coding": [{"code": verification}]}
    if onset:
        c["onsetDateTime"] = onset
    return c


@pytest.mark.parametrize(
    "system, code, flags",
    [
        (SNOMED, "84114007", {"heart_failure"}),
        (SNOMED, "446221000", {"heart_failure"}),
        (SNOMED, "401303003", {"myocardial_infarction"}),
        (SNOMED, "282825002", {"atrial_fibrillation"}),
        (SNOMED, "59621000", {"hypertension"}),
        (SNOMED, "44054006", {"diabetes"}),
        (SNOMED, "433146000", {"chronic_kidney_disease"}),
        (ICD10_SYSTEMS[0], "I50.22", {"heart_failure"}),
        (ICD10_SYSTEMS[0], "I25.2", {"myocardial_infarction"}),
        (ICD10_SYSTEMS[0], "I21.4", {"myocardial_infarction"}),
        (ICD10_SYSTEMS[0], "I48.19", {"atrial_fibrillation"}),
        (ICD10_SYSTEMS[0], "I48.92", set()),  # atrial flutter
        (ICD10_SYSTEMS[0], "I48.3", set()),
        (ICD10_SYSTEMS[1], "I10", {"hypertension"}),
        (ICD10_SYSTEMS[0], "I11.0", {"hypertension", "heart_failure"}),
        (ICD10_SYSTEMS[0], "I13.0", {"hypertension", "heart_failure", "chronic_kidney_disease"}),
        (ICD10_SYSTEMS[0], "E11.9", {"diabetes"}),
        (ICD10_SYSTEMS[0], "N184", {"chronic_kidney_disease"}),
        (ICD10_SYSTEMS[0], "I25.10", set()),  # coronary disease without old MI
        ("urn:local", "84114007", set()),
    ],
)
def test_condition_codes(system: str, code: str, flags: set[str]) -> None:
    assert condition_flags({"coding": [{"system": system, "code": code}]}) == flags


def test_condition_statuses_and_onset() -> None:
    history = condition_history(
        [
            cond(SNOMED, "84114007", clinical="resolved"),  # resolved HF: not counted
            cond(SNOMED, "1755008", clinical="resolved"),  # an old MI is history
            cond(SNOMED, "49436004", verification="refuted"),
            cond(SNOMED, "59621000", verification="entered-in-error"),
            cond(SNOMED, "44054006", onset=at(days=3)),  # diagnosed after the ECG
            cond(SNOMED, "709044004", clinical=None),  # no clinicalStatus: counted
        ],
        reference_time=ECG,
    )
    assert history == {
        "heart_failure": False,
        "myocardial_infarction": True,
        "atrial_fibrillation": False,
        "hypertension": False,
        "diabetes": False,
        "chronic_kidney_disease": True,
    }
    assert condition_history([cond(SNOMED, "42343007", clinical="recurrence")], reference_time=ECG)["heart_failure"]


# ----- medications ----------------------------------------------------------------


def med(concept: dict[str, Any], status: str = "active", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "MedicationStatement", "status": status, "medicationCodeableConcept": concept, **extra}


@pytest.mark.parametrize(
    "concept, classes",
    [
        ({"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "4603"}]}, {"loop_diuretic"}),
        (
            {
                "coding": [
                    {
                        "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                        "code": "310429",
                        "display": "furosemide 20 MG Oral Tablet",
                    }
                ]
            },
            {"loop_diuretic"},
        ),
        ({"coding": [{"system": "http://www.whocc.no/atc", "code": "C07AB07"}]}, {"beta_blocker"}),
        ({"coding": [{"system": "http://www.whocc.no/atc", "code": "C09DX04"}]}, {"ace_inhibitor_or_arb"}),
        ({"coding": [{"system": "http://www.whocc.no/atc", "code": "C09XA02"}]}, set()),  # aliskiren
        ({"coding": [{"system": "http://www.whocc.no/atc", "code": "C03DA01"}]}, {"mineralocorticoid_antagonist"}),
        ({"text": "Entresto (sacubitril / valsartan) 49/51 mg"}, {"ace_inhibitor_or_arb"}),
        ({"text": "Metoprolol succinate ER 50 mg"}, {"beta_blocker"}),
        ({"text": "Torasemide 10 mg"}, {"loop_diuretic"}),
        ({"text": "Atorvastatin 40 mg"}, set()),
    ],
)
def test_medication_classes(concept: dict[str, Any], classes: set[str]) -> None:
    assert medication_classes(concept) == classes


def test_medication_status_and_period() -> None:
    taken = medication_use(
        [
            med({"text": "furosemide"}, effectivePeriod={"start": at(days=-100)}),
            med(
                {"text": "carvedilol"}, status="stopped", effectivePeriod={"start": at(days=-100), "end": at(days=-10)}
            ),
            med({"text": "ramipril"}, status="completed", effectivePeriod={"start": at(days=-100), "end": at(days=10)}),
            med({"text": "spironolactone"}, effectivePeriod={"start": at(days=2)}),  # started after the ECG
            med({"text": "bisoprolol"}, status="entered-in-error"),
            med({"text": "eplerenone"}, status="not-taken"),
        ],
        reference_time=ECG,
    )
    assert taken == {
        "loop_diuretic": True,
        "beta_blocker": False,
        "ace_inhibitor_or_arb": True,
        "mineralocorticoid_antagonist": False,
    }


def test_medication_reference_without_display_is_reported() -> None:
    ctx = context_from_resources(
        {"resourceType": "Patient", "id": "p"},
        [],
        [],
        [
            {
                "resourceType": "MedicationStatement",
                "status": "active",
                "medicationReference": {"reference": "Medication/9"},
            }
        ],
        acquired_at=ECG,
        window_days=365,
        source=None,
    )
    assert ctx.medications == dict.fromkeys(EHR_MEDICATION_NAMES, False)
    assert "refer to a Medication resource" in ctx.problems[0]


# ----- patient, times, the whole context ------------------------------------------


def test_age_and_dates() -> None:
    assert age_at("1950-03-10", ECG) == pytest.approx(75.0, abs=0.01)
    assert age_at("1950", ECG) == pytest.approx(74.69, abs=0.01)  # mid-year
    assert age_at("1950-03", ECG) == pytest.approx(74.99, abs=0.01)
    assert age_at("2030-01-01", ECG) is None and age_at("junk", ECG) is None and age_at(None, ECG) is None
    assert parse_fhir_datetime("2024") == datetime(2024, 1, 1, tzinfo=UTC)
    assert parse_fhir_datetime("2024-05-01T10:00:00+02:00") == datetime(2024, 5, 1, 8, tzinfo=UTC)
    assert parse_fhir_datetime("2024-05-01") == datetime(2024, 5, 1, tzinfo=UTC)
    assert parse_fhir_datetime("not a date") is None


def test_context_shape_sex_naive_time_and_round_trip() -> None:
    patient = {"resourceType": "Patient", "id": "abc", "gender": "female", "birthDate": "1960-01-01"}
    naive = ECG.astimezone().replace(tzinfo=None)  # the machine's local wall-clock time of the ECG
    ctx = context_from_resources(
        patient, [obs("8867-4", 80, "/min", at(minutes=-5))], [], [], acquired_at=naive, window_days=365, source="ehr"
    )
    assert ctx.status == "complete" and ctx.patient_reference == "Patient/abc" and ctx.sex == "female"
    assert ctx.values["heart_rate"].value == 80 and ctx.has_data
    assert ctx.conditions == dict.fromkeys(EHR_CONDITION_NAMES, False)
    assert EhrContext.from_dict(ctx.to_dict()) == ctx
    unknown = context_from_resources(patient, [], None, None, acquired_at=None, window_days=365, source=None)
    assert unknown.problems == ("ECG acquisition time unknown: the window ends now",)
    assert (
        context_from_resources(None, None, None, None, acquired_at=ECG, window_days=1, source="x").status
        == "no_patient"
    )
