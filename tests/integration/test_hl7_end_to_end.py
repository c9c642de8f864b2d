"""Issue 3's acceptance path: HL7 in, HL7 out, with the order linked.

mllp_send (python-hl7, not ours) sends an ORM^O01 and then an ORU^R01 carrying the
12-lead waveform of a real record; a real gateway and worker analyse it; the test
EHR (python-hl7's asyncio MLLP server) receives exactly one ORU^R01 that hl7apy
validates at v2.5.1 and that carries the order numbers of the ORM sent before it.
"""

from __future__ import annotations

from pathlib import Path

import hl7
import pytest

from ecgbridge.mapping.hl7_oru import validate_er7
from tests.integration.test_mllp import _uid, mllp_send, msa, orm, oru, wait_row
from tests.support.hl7_receiver import Hl7Receiver
from tests.support.processes import wait_for

pytestmark = pytest.mark.integration


def test_orm_then_oru_over_mllp_gives_one_linked_oru_to_the_ehr(make_stack, tmp_path: Path) -> None:
    with Hl7Receiver("AA") as ehr:
        stack = make_stack(
            mllp_options={"enabled": True},
            extra={
                "destinations": [
                    {
                        "name": "ehr-hl7",
                        "type": "hl7",
                        "host": "127.0.0.1",
                        "port": ehr.port,
                        "ack_timeout_s": 10,
                        "receiving_application": "EHR",
                    }
                ],
                "routes": [
                    {
                        "name": "hl7-carts",
                        "match": {"sources": ["hl7"], "message_types": ["ORU^R01"]},
                        "models": ["diagnosis"],
                        "destinations": ["ehr-hl7"],
                    }
                ],
            },
        )
        stack.start_worker()
        stack.start_gateway()
        placer = f"PL{_uid()}"
        acks = mllp_send(
            stack.mllp_port,
            [orm(f"O{placer}", placer, f"F{placer}").encode(), oru(f"R{placer}", placer).encode()],
            tmp_path,
        )
        assert [msa(a)[0] for a in acks] == ["AA", "AA"]
        wait_row(stack, placer, ("delivered",))
        wait_for(lambda: len(ehr.received) >= 1, 30, 0.2, "the ORU at the EHR")

        (message,) = ehr.received
        validate_er7(message)  # hl7apy, strict, v2.5.1
        parsed = hl7.parse(message)
        assert str(parsed.segment("MSH")[9]) == "ORU^R01^ORU_R01"
        obr, orc = parsed.segment("OBR"), parsed.segment("ORC")
        first = lambda field: str(field).split("^")[0]  # noqa: E731 - EI.1 of an order number
        assert first(obr[2]) == placer and first(obr[3]) == f"F{placer}"
        assert first(orc[2]) == placer and "Smith" in str(orc[12])
        probabilities = [s for s in parsed.segments("OBX") if str(s[2]) == "NM" and "probability" in str(s[3])]
        assert len(probabilities) == 5
        assert any("NOT FOR CLINICAL USE" in str(s) for s in parsed.segments("NTE"))
