"""Circuit breaker state machine (Grokputer diagram 5; SPEC §4).

CLOSED --failure_threshold consecutive failures--> OPEN --open_timeout elapsed--> HALF_OPEN;
HALF_OPEN --success_threshold successes--> CLOSED; any failure in HALF_OPEN --> OPEN.
Defaults 5 failures / 60 s / 2 successes are the seed's. The machine is pure and driven by
event times (ms since the epoch), never the wall clock, so replaying the calls topic
rebuilds exactly the same state. Persistence and atomicity live in the breaker projection.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

BreakerStateName = Literal["closed", "open", "half_open"]
Admission = Literal["allow", "trial", "reject"]


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 5
    open_timeout_ms: int = 60_000
    success_threshold: int = 2
    half_open_max_calls: int = 2


@dataclass(frozen=True)
class BreakerState:
    state: BreakerStateName = "closed"
    failures: int = 0
    successes: int = 0
    opened_at_ms: int = 0

    def to_hash(self) -> dict[str, str]:
        return {"state": self.state, "failures": str(self.failures),
                "successes": str(self.successes), "opened_at_ms": str(self.opened_at_ms)}

    @classmethod
    def from_hash(cls, h: dict[str, str] | dict[bytes, bytes]) -> BreakerState:
        d = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in h.items()}
        if not d:
            return cls()
        return cls(state=d["state"], failures=int(d["failures"]),  # type: ignore[arg-type]
                   successes=int(d["successes"]), opened_at_ms=int(d["opened_at_ms"]))


@dataclass(frozen=True)
class Transition:
    from_state: BreakerStateName
    to_state: BreakerStateName
    reason: str
    failures: int
    successes: int


def admission(s: BreakerState, now_ms: int, cfg: BreakerConfig) -> Admission:
    """Whether a new call may go out: ``allow`` (closed), ``trial`` (half-open, or open with
    its timeout elapsed: the caller must hold one of ``half_open_max_calls`` permits) or
    ``reject`` (open: fail fast)."""
    if s.state == "closed":
        return "allow"
    if s.state == "open" and now_ms < s.opened_at_ms + cfg.open_timeout_ms:
        return "reject"
    return "trial"


def apply_outcome(
    s: BreakerState, ok: bool, at_ms: int, cfg: BreakerConfig
) -> tuple[BreakerState, list[Transition]]:
    """Apply one call outcome that happened at event time ``at_ms``.

    Returns the new state and the transitions it caused (zero, one, or two: an outcome
    arriving after the open timeout first moves OPEN -> HALF_OPEN, then counts there).
    Outcomes while OPEN and before the timeout are calls that were already in flight: ignored.
    """
    transitions: list[Transition] = []
    if s.state == "open":
        if at_ms < s.opened_at_ms + cfg.open_timeout_ms:
            return s, transitions
        s = replace(s, state="half_open", successes=0)
        transitions.append(Transition("open", "half_open", "open timeout elapsed", s.failures, 0))
    if s.state == "closed":
        if ok:
            return replace(s, failures=0), transitions
        s = replace(s, failures=s.failures + 1)
        if s.failures >= cfg.failure_threshold:
            transitions.append(Transition("closed", "open", f"{s.failures} consecutive failures",
                                          s.failures, 0))
            s = replace(s, state="open", opened_at_ms=at_ms, successes=0)
        return s, transitions
    # half_open
    if not ok:
        transitions.append(Transition("half_open", "open", "failure in half-open", s.failures + 1,
                                      s.successes))
        return replace(s, state="open", failures=s.failures + 1, successes=0,
                       opened_at_ms=at_ms), transitions
    s = replace(s, successes=s.successes + 1)
    if s.successes >= cfg.success_threshold:
        transitions.append(Transition("half_open", "closed", f"{s.successes} successes in half-open",
                                      s.failures, s.successes))
        s = BreakerState()
    return s, transitions
