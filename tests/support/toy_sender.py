"""A toy destination type, written the way a site would add one: this module and nothing else.

``type: toy`` destinations write each result as a JSON file into ``folder``; a file
named ``fail-next`` in that folder makes the next send fail transiently (and is removed),
``refuse`` makes every send fail for good, ``busy-next`` makes the next one find the destination busy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, cast

from ecgbridge.core.settings import DestinationConfig
from ecgbridge.errors import DestinationBusy, PermanentDeliveryError, TransientDeliveryError
from ecgbridge.outbound.sender import Outgoing, Sender, register_sender


class ToyDestination(DestinationConfig):
    type: Literal["toy"] = "toy"
    folder: Path
    #: Write the rendered report's files' hashes too (the report is drawn for this destination).
    with_report: bool = True

    def wants_report(self) -> bool:
        return self.with_report


@register_sender
class ToySender(Sender):
    type = "toy"
    config_class = ToyDestination

    def send(self, outgoing: Outgoing) -> str:
        folder = cast(ToyDestination, self.config).folder
        if (folder / "refuse").exists():
            raise PermanentDeliveryError("the toy receiver refuses everything")
        busy = folder / "busy-next"
        if busy.exists():
            busy.unlink()
            raise DestinationBusy("the toy receiver's slots are all taken")
        fail = folder / "fail-next"
        if fail.exists():
            fail.unlink()
            raise TransientDeliveryError("the toy receiver is busy")
        target = folder / f"{outgoing.message_id}.json"
        payload = {
            "message_id": outgoing.message_id,
            "models": [f"{o.model}@{o.version}" for o in outgoing.result.outputs],
            "label": outgoing.result.label,
            "attachments": sorted(outgoing.attachments),
        }
        target.write_text(json.dumps(payload, indent=1), encoding="utf-8")
        return f"toy:{target.name}"
