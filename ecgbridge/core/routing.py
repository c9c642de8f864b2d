"""Route matching: which models and destinations a message goes to, and why.

Routes are tried in file order and the first match wins. Deny by default: a
message no route matches is stored and marked ``unrouted``, never analysed
and never dropped. :func:`explain_routing` says, in words IT staff read, which
route took a message and the first criterion each other route failed on;
:func:`match_route` is its answer alone, so the two can never disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ecgbridge.core.settings import Route

__all__ = [
    "MessageFacts",
    "RouteVerdict",
    "RoutingExplanation",
    "match_route",
    "route_failure",
    "route_criteria",
    "explain_routing",
    "sop_class_name",
]

#: SOP classes IT staff recognise by name (the ECG storage classes the DICOM listener takes).
_SOP_CLASS_NAMES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.9.1.1": "12-lead ECG Waveform Storage",
    "1.2.840.10008.5.1.4.1.1.9.1.2": "General ECG Waveform Storage",
    "1.2.840.10008.5.1.4.1.1.9.1.3": "Ambulatory ECG Waveform Storage",
}
#: Criteria lists longer than this are shortened in the words shown.
_SHOWN = 8


@dataclass(frozen=True)
class MessageFacts:
    """What routing may look at; no patient data."""

    source: str  # dicom | file | hl7
    calling_ae_title: str | None = None
    sop_class_uid: str | None = None
    sending_application: str | None = None  # MSH-3.1
    sending_facility: str | None = None  # MSH-4.1
    message_type: str | None = None  # MSH-9 as TYPE^EVENT
    obx_codes: tuple[str, ...] = ()  # OBX-3.1 of every OBX

    def describe(self) -> str:
        """What routing looked at, for the ``unrouted`` event IT staff read."""
        if self.source == "dicom":
            return f"source dicom, calling AE {self.calling_ae_title}, SOP class {self.sop_class_uid}"
        if self.source == "hl7":
            return (
                f"source hl7, sending application {self.sending_application}, facility "
                f"{self.sending_facility}, {self.message_type}, OBX codes {', '.join(self.obx_codes[:12]) or '-'}"
            )
        return f"source {self.source}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "calling_ae_title": self.calling_ae_title,
            "sop_class_uid": self.sop_class_uid,
            "sending_application": self.sending_application,
            "sending_facility": self.sending_facility,
            "message_type": self.message_type,
            "obx_codes": list(dict.fromkeys(self.obx_codes)),
        }


Outcome = Literal["matched", "failed", "not_tried"]


@dataclass(frozen=True)
class RouteVerdict:
    """One route's part in the decision: matched, failed (and on what), or not tried."""

    route: str
    index: int  # position in the configuration (routes[index])
    outcome: Outcome
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"route": self.route, "index": self.index, "outcome": self.outcome, "reason": self.reason}


@dataclass(frozen=True)
class RoutingExplanation:
    """Which route a message takes (``matched``; None: unrouted) and why each other one did not."""

    facts: MessageFacts
    verdicts: tuple[RouteVerdict, ...]
    matched: Route | None

    def lines(self) -> list[str]:
        """The decision as lines of text: the matching route first, then every route in order."""
        if self.matched is not None:
            m = self.matched
            head = (
                f"matches route {m.name!r}: models {', '.join(m.models) or '-'}, "
                f"destinations {', '.join(m.destinations) or '-'}"
                + (f", EHR context {m.ehr_context}" if m.ehr_context else "")
            )
        elif not self.verdicts:
            head = "no route matches: the configuration has no routes; the message would be stored as unrouted"
        else:
            head = "no route matches: the message would be stored as unrouted (kept, not analysed)"
        out = [head]
        for v in self.verdicts:
            mark = {"matched": "MATCH", "failed": "no", "not_tried": "-"}[v.outcome]
            out.append(f"  {mark:<5} routes[{v.index}] {v.route}: {v.reason}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "facts": self.facts.to_dict(),
            "matched": self.matched.name if self.matched is not None else None,
            "routes": [v.to_dict() for v in self.verdicts],
        }


def sop_class_name(uid: str | None) -> str:
    """``uid`` with its name when it is one of the ECG classes, e.g. '1.2...9.1.1 (12-lead ECG ...)'."""
    if not uid:
        return "(none)"
    name = _SOP_CLASS_NAMES.get(uid)
    return f"{uid} ({name})" if name else uid


def _listed(values: Iterable[str]) -> str:
    items = list(values)
    shown = ", ".join(items[:_SHOWN]) + (f", ... ({len(items)} in all)" if len(items) > _SHOWN else "")
    return f"[{shown}]"


def _value(value: str | None) -> str:
    return value if value else "(none)"


def route_failure(route: Route, facts: MessageFacts) -> str | None:
    """The first criterion of ``route`` that ``facts`` fail, in words; None when the route matches."""
    m = route.match
    if facts.source not in m.sources:
        return f"source {facts.source} is not one of {_listed(m.sources)}"
    calling = (facts.calling_ae_title or "").strip()
    if m.calling_ae_titles and calling not in m.calling_ae_titles:
        return f"calling AE {_value(calling)} is not one of {_listed(m.calling_ae_titles)}"
    if m.sop_class_uids and facts.sop_class_uid not in m.sop_class_uids:
        return f"SOP class {sop_class_name(facts.sop_class_uid)} is not listed in {_listed(m.sop_class_uids)}"
    if m.sending_applications and facts.sending_application not in m.sending_applications:
        return (
            f"sending application (MSH-3) {_value(facts.sending_application)} "
            f"is not one of {_listed(m.sending_applications)}"
        )
    if m.sending_facilities and facts.sending_facility not in m.sending_facilities:
        return (
            f"sending facility (MSH-4) {_value(facts.sending_facility)} is not one of {_listed(m.sending_facilities)}"
        )
    if m.message_types and facts.message_type not in m.message_types:
        return f"message type (MSH-9) {_value(facts.message_type)} is not one of {_listed(m.message_types)}"
    if m.obx_codes and not set(m.obx_codes) & set(facts.obx_codes):
        present = list(dict.fromkeys(facts.obx_codes))
        has = f" (it has {_listed(present)})" if present else " (it has no OBX codes)"
        return f"no OBX code of {_listed(m.obx_codes)} in the message{has}"
    return None


def route_criteria(route: Route) -> str:
    """What ``route`` asks of a message, in words ("source in [dicom]; calling AE in [CART1]")."""
    m = route.match
    held = []
    if set(m.sources) != {"dicom", "hl7", "file"}:
        held.append(f"source in {_listed(m.sources)}")
    for label, values in (
        ("calling AE", m.calling_ae_titles),
        ("SOP class", m.sop_class_uids),
        ("sending application", m.sending_applications),
        ("sending facility", m.sending_facilities),
        ("message type", m.message_types),
        ("OBX code", m.obx_codes),
    ):
        if values:
            held.append(f"{label} in {_listed(values)}")
    return "; ".join(held) if held else "every message (no criteria)"


def _matched_reason(route: Route) -> str:
    criteria = route_criteria(route)
    return "matches every message (no criteria)" if criteria.startswith("every message") else f"matches: {criteria}"


def explain_routing(routes: Sequence[Route], facts: MessageFacts) -> RoutingExplanation:
    """Try ``routes`` in order as :func:`match_route` does, saying why each did or did not match."""
    verdicts: list[RouteVerdict] = []
    matched: Route | None = None
    for i, route in enumerate(routes):
        if matched is not None:
            verdicts.append(RouteVerdict(route.name, i, "not_tried", "not tried: an earlier route matched"))
            continue
        failure = route_failure(route, facts)
        if failure is None:
            matched = route
            verdicts.append(RouteVerdict(route.name, i, "matched", _matched_reason(route)))
        else:
            verdicts.append(RouteVerdict(route.name, i, "failed", failure))
    return RoutingExplanation(facts, tuple(verdicts), matched)


def match_route(routes: Sequence[Route], facts: MessageFacts) -> Route | None:
    """The first route whose every criterion holds; None: the message is unrouted."""
    for route in routes:
        if route_failure(route, facts) is None:
            return route
    return None
