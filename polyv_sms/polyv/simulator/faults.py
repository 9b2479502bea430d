"""Fault injection and counters of :mod:`polyv_sms.polyv.simulator`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from datetime import date

__all__ = ["MAX_LATENCY_S", "Faults", "Tally", "is_int"]

MAX_LATENCY_S = 3600.0


def is_int(value: object) -> bool:
    """True for an ``int`` that is not a ``bool`` (JSON integers)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Faults:
    """Faults to inject; every ``*_rate`` is a share from 0 to 1, drawn with ``seed``.

    ``drop``, ``http500``, ``garbage`` and ``rate_limit`` are decided by one draw per request,
    in that order (their shares add up; past 1 the earlier win); such a request is not
    processed. ``fail_numbers`` maps a number to how many times it is answered 11 before the
    checks let it through; ``status11_rate`` draws 11 per valid number; ``invalid_numbers``
    are answered -2 although they look valid (Polyv knows numbers we cannot check).
    ``latency_s`` delays every send answer after processing, and ``slow_rate`` of them by
    ``slow_latency_s`` more.
    """

    status11_rate: float = 0.0
    fail_numbers: dict[str, int] = field(default_factory=dict)
    invalid_numbers: list[str] = field(default_factory=list)
    http500_rate: float = 0.0
    latency_s: float = 0.0
    slow_rate: float = 0.0
    slow_latency_s: float = 0.0
    drop_rate: float = 0.0
    garbage_rate: float = 0.0
    rate_limit_rate: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in (f.name for f in fields(self) if f.name.endswith(("_rate", "_s"))):
            value, upper = getattr(self, name), 1.0 if name.endswith("_rate") else MAX_LATENCY_S
            if not (is_int(value) or isinstance(value, float)) or not 0 <= value <= upper:
                raise ValueError(f"{name} must be a number from 0 to {upper:g}, got {value!r}")
        counts = self.fail_numbers
        if not isinstance(counts, dict) or not all(
            isinstance(k, str) and is_int(v) and v >= 0 for k, v in counts.items()
        ):
            raise ValueError("fail_numbers must map phone numbers (strings) to counts >= 0")
        self.fail_numbers = dict(counts)
        if not isinstance(self.invalid_numbers, list | tuple | set) or not all(
            isinstance(n, str) for n in self.invalid_numbers
        ):
            raise ValueError("invalid_numbers must be a list of phone numbers (strings)")
        self.invalid_numbers = list(self.invalid_numbers)
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be an integer or null, got {self.seed!r}")


@dataclass
class Tally:
    """What :meth:`PolyvSimulator.reset` forgets besides the records."""

    fail_remaining: dict[str, int]
    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)  # all numbers processed
    by_outcome: Counter[str] = field(default_factory=Counter)  # faults and error codes
    accepted: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)
    day: date | None = None
    today: Counter[str | tuple[str, None]] = field(
        default_factory=Counter
    )  # (appId, None): account
