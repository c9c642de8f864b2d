"""What every fuzz property shares: a hard time limit per call, the allowed answers, a case counter.

Why a SIGALRM limit next to hypothesis's ``deadline``: the deadline is measured after an
example returns, so a real hang would never be reported; the alarm interrupts it. The
limit also ends the whole run when its overall budget (``set_budget``) is spent.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
from hypothesis import HealthCheck, Phase, settings

from ecgbridge.errors import Hl7Error, InputError
from ecgbridge.mapping.ecg import STANDARD_LEADS, Ecg

__all__ = [
    "CALL_LIMIT_S",
    "EXAMPLE_DEADLINE",
    "Hang",
    "NoAnswer",
    "answered",
    "time_limit",
    "set_budget",
    "check_ecg",
    "ci_settings",
    "COUNTS",
]

T = TypeVar("T")

#: Longest one call into a reader may take before it counts as a hang (seconds).
CALL_LIMIT_S = 10.0
#: hypothesis's per-example deadline: 10-50x what an example takes here, so load on a shared
#: machine does not make it flaky, while a reader gone quadratic still fails.
EXAMPLE_DEADLINE = timedelta(seconds=3)
#: Cases run per fuzz case name, for the summary the conftest and the bench print.
COUNTS: Counter[str] = Counter()
_budget_end: float | None = None


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` in the product swallows it."""


class NoAnswer(AssertionError):
    """An input was not answered as documented: it hung, or it raised outside the InputError family."""


def set_budget(seconds: float | None) -> None:
    """End every call once ``seconds`` from now have passed (None: no overall budget)."""
    global _budget_end
    _budget_end = None if seconds is None else time.monotonic() + seconds


@contextmanager
def time_limit(seconds: float = CALL_LIMIT_S) -> Iterator[None]:
    """Interrupt the block with :class:`NoAnswer` after ``seconds`` (or when the overall budget ends)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return
    limit = seconds if _budget_end is None else min(seconds, _budget_end - time.monotonic())
    if limit <= 0:
        raise NoAnswer("the overall fuzzing time budget is spent")

    def alarm(signum: int, frame: Any) -> None:
        raise Hang()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    except Hang:
        raise NoAnswer(f"hang: no answer within {limit:.1f} s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def answered(call: Callable[[], T]) -> T | InputError:
    """``call()``'s result, or the documented InputError it raised; anything else escapes (a crasher)."""
    try:
        with time_limit():
            return call()
    except InputError as exc:
        if not isinstance(exc.message, str) or not exc.message.strip():
            raise NoAnswer(f"{type(exc).__name__} without a message") from exc
        if isinstance(exc, Hl7Error) and exc.hl7_ack_code not in ("AE", "AR"):
            raise NoAnswer(f"Hl7Error with ACK code {exc.hl7_ack_code!r}") from exc
        return exc


def check_ecg(ecg: object) -> None:
    """A reader's Ecg is usable: standard leads once each, finite samples, a positive finite rate."""
    assert isinstance(ecg, Ecg), type(ecg)
    assert ecg.signals.ndim == 2 and ecg.signals.shape[0] == len(ecg.leads) >= 2, ecg.signals.shape
    assert set(ecg.leads) <= set(STANDARD_LEADS) and len(set(ecg.leads)) == len(ecg.leads), ecg.leads
    assert ecg.signals.shape[1] >= 1, "an ECG without samples"
    assert bool(np.isfinite(ecg.signals).all()), "samples that are NaN or infinite"
    assert math.isfinite(ecg.fs) and ecg.fs > 0, ecg.fs


def ci_settings(examples: int) -> settings:
    """The bounded CI run: a fixed seed (derandomize), no example database, the deadline above."""
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=EXAMPLE_DEADLINE,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=(HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example),
        print_blob=False,
    )
