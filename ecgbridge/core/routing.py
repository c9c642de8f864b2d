"""Route matching: which models and destinations a message goes to.

Routes are tried in file order and the first match wins. Deny by default: a
message no route matches is stored and marked ``unrouted``, never analysed
and never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from ecgbridge.core.settings import Route

__all__ = ["MessageFacts", "match_route"]


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


def _matches(route: Route, facts: MessageFacts) -> bool:
    m = route.match
    if facts.source not in m.sources:
        return False
    if m.calling_ae_titles and (facts.calling_ae_title or "").strip() not in m.calling_ae_titles:
        return False
    if m.sop_class_uids and facts.sop_class_uid not in m.sop_class_uids:
        return False
    if m.sending_applications and facts.sending_application not in m.sending_applications:
        return False
    if m.sending_facilities and facts.sending_facility not in m.sending_facilities:
        return False
    if m.message_types and facts.message_type not in m.message_types:
        return False
    if m.obx_codes and not set(m.obx_codes) & set(facts.obx_codes):
        return False
    return True


def match_route(routes: list[Route], facts: MessageFacts) -> Route | None:
    for route in routes:
        if _matches(route, facts):
            return route
    return None
