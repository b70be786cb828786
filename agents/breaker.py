"""Circuit breaker, one per provider (Grokputer diagram 5; SPEC §4; issue item 1).

The machine here is pure and driven by event times (ms since the epoch), never the wall clock,
so replaying the calls topic rebuilds exactly the same state. The protocol:

1. **Classify** each call outcome (:func:`classify`): a success; a failure (5xx, 429, timeouts,
   lost connections, malformed bodies, unknown models); an ``auth`` failure (401/403); a
   ``quota`` failure (402, ``insufficient_quota``); or ``ignore`` (400s that are the caller's
   fault: ``bad_request`` with 400/413/422, ``context_length_exceeded``), which never counts.
2. **CLOSED** counts. It trips (-> OPEN) on whichever comes first: ``failure_threshold``
   consecutive failures (seed: 5); a failure rate >= ``failure_rate`` over the last
   ``window_size`` counted calls once ``minimum_calls`` are in the window; a slow-call rate
   >= ``slow_call_rate`` for calls over ``slow_call_ms``. The window holds the latest
   ``window_size`` calls (resilience4j's count-based window) and, when ``window_ms`` is set,
   only those of the last ``window_ms`` of event time (its time-based window).
   An auth or quota failure trips it at once.
3. **OPEN** fails fast until ``open_until_ms``. A trip opens it for ``open_timeout_ms``
   (seed: 60 s) times ``backoff_factor`` per earlier consecutive trip (trips since the last
   close), at most ``max_open_ms``, or for the provider's Retry-After when longer (also at
   most ``max_open_ms``). A quota failure opens it for ``quota_open_ms``; an auth failure opens
   it until the provider's configuration changes (step 6) or an operator closes it. A deadline
   is never shortened (LiteLLM's re-cooling can): outcomes of calls that were in flight when it
   opened only push it later (a longer Retry-After, a quota or auth failure).
4. **HALF-OPEN.** The first outcome at or after the deadline moves OPEN -> HALF_OPEN and counts
   there. Admission (:func:`admission`) answers ``trial`` from the deadline on: the executor
   may only call on one of ``half_open_max_calls`` permits shared by every process
   (:data:`TAKE_PERMITS`). Each permit expires ``permit_ttl`` after it was taken, so a trial
   whose process crashed or whose call hangs never pins the breaker (resilience4j's can).
   ``success_threshold`` (seed: 2) successes close it; any failure, or a success slower than
   ``slow_call_ms``, reopens it (step 3, with backoff).
5. **Manual** commands (:func:`apply_command`, from ``BreakerCommand`` events on the calls
   topic, so they apply in the provider's order): ``open`` holds it open until a ``close`` or
   ``reset``; ``close`` closes it keeping the trip count (a provider that still fails
   re-trips with a longer open time); ``reset`` forgets everything.
6. **Configuration change.** An auth trip stores the fingerprint of the provider's
   configuration from the failed call's event (``config_fingerprint``). Admission allows calls
   from a worker whose fingerprint differs (a new key was deployed); the first outcome recorded
   under a different fingerprint closes the breaker (reason "configuration changed") and then
   counts as in CLOSED.

Every change of state, and every change of an open breaker's hold, is a :class:`Transition`
(a ``BreakerTransitioned`` event, streams/projections.py). Persistence and atomicity live in
the breaker projection: the executor.breaker consumer applies a batch inside the stage
runner's MULTI/EXEC with its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

BreakerStateName = Literal["closed", "open", "half_open"]
Admission = Literal["allow", "trial", "reject"]
Verdict = Literal["success", "failure", "auth", "quota", "ignore"]
Hold = Literal["", "auth", "quota", "manual"]
Command = Literal["open", "close", "reset"]

FOREVER_MS = 253_402_300_799_000
"""The deadline of a breaker held open until a person or a configuration change acts:
9999-12-31T23:59:59Z, the latest time a ``datetime`` (and so an event's ``open_until``) holds."""

CALLER_FAULT_TYPES = frozenset({"bad_request", "context_length_exceeded"})
CALLER_FAULT_STATUSES = frozenset({None, 400, 413, 422})
"""A ``bad_request`` with these statuses is the request's fault, not the provider's; a 404
(unknown model) is a configuration error and counts as a failure."""

# window entries: (failed, slow) -> one character, so the window is one short hash field
_WINDOW_CHARS = {(False, False): ".", (False, True): "s", (True, False): "x", (True, True): "X"}


@dataclass(frozen=True)
class BreakerConfig:
    """Breaker parameters; times in ms, rates in [0, 1].

    Seed defaults (SPEC §7): 5 consecutive failures, 60 s open, 2 successes. The rate rules
    follow resilience4j (failureRateThreshold 50 %, slidingWindowSize 100,
    slowCallRateThreshold 100 %); its minimumNumberOfCalls (100) is lowered to 20 so a rate
    trip can happen at moderate traffic, and its slowCallDurationThreshold (60 s) to 20 s
    because the executor times calls out at 30 s. Backoff doubling capped at 10 min, quota
    1 h and the 45 s permit expiry (longer than a 30 s trial call) are this project's choices.
    """

    failure_threshold: int = 5
    open_timeout_ms: int = 60_000
    success_threshold: int = 2
    half_open_max_calls: int = 2
    failure_rate: float = 0.5
    window_size: int = 100
    window_ms: int = 0
    minimum_calls: int = 20
    slow_call_ms: float = 20_000.0
    slow_call_rate: float = 1.0
    backoff_factor: float = 2.0
    max_open_ms: int = 600_000
    quota_open_ms: int = 3_600_000
    permit_ttl_ms: int = 45_000


@dataclass(frozen=True)
class BreakerState:
    """One provider's breaker. ``failures``: consecutive failures (kept through a trip for the
    report); ``successes``: half-open successes; ``opened_at_ms``/``open_until_ms``: event times
    of the last trip and its deadline; ``trips``: consecutive trips since the last close (the
    backoff exponent); ``window``: the latest counted calls in CLOSED, one character each
    (``.`` ok, ``s`` slow ok, ``x`` failed, ``X`` slow failed), and ``window_at``: their event
    times (ms, comma-separated; only with a time-based window); ``reason``: of the last
    transition; ``hold``: why it is open beyond the normal timeout; ``fingerprint``: the
    provider configuration an auth trip happened under."""

    state: BreakerStateName = "closed"
    failures: int = 0
    successes: int = 0
    opened_at_ms: int = 0
    open_until_ms: int = 0
    trips: int = 0
    window: str = ""
    window_at: str = ""
    reason: str = ""
    hold: Hold = ""
    fingerprint: str = ""

    def to_hash(self) -> dict[str, str]:
        return {"state": self.state, "failures": str(self.failures),
                "successes": str(self.successes), "opened_at_ms": str(self.opened_at_ms),
                "open_until_ms": str(self.open_until_ms), "trips": str(self.trips),
                "window": self.window, "window_at": self.window_at, "reason": self.reason,
                "hold": self.hold,
                "fingerprint": self.fingerprint}

    @classmethod
    def from_hash(cls, h: dict[str, str] | dict[bytes, bytes]) -> BreakerState:
        d = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in h.items()}
        if not d:
            return cls()
        return cls(state=d["state"], failures=int(d["failures"]),  # type: ignore[arg-type]
                   successes=int(d["successes"]), opened_at_ms=int(d["opened_at_ms"]),
                   open_until_ms=int(d.get("open_until_ms", "0")), trips=int(d.get("trips", "0")),
                   window=d.get("window", ""), window_at=d.get("window_at", ""),
                   reason=d.get("reason", ""),
                   hold=d.get("hold", ""), fingerprint=d.get("fingerprint", ""))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Transition:
    """One change of a breaker: ``trigger`` is a machine tag (``consecutive_failures``,
    ``failure_rate``, ``slow_call_rate``, ``auth``, ``quota``, ``half_open_failure``,
    ``timeout_elapsed``, ``half_open_successes``, ``config_changed``, ``retry_after``,
    ``manual_open``, ``manual_close``, ``manual_reset``), ``reason`` the sentence shown."""

    from_state: BreakerStateName
    to_state: BreakerStateName
    reason: str
    failures: int
    successes: int
    trigger: str = ""
    open_until_ms: int | None = None


def classify(ok: bool, error_type: str | None = None, http_status: int | None = None) -> Verdict:
    """Step 1: how an outcome weighs (error types of agents/providers/base.py)."""
    if ok:
        return "success"
    if error_type == "auth_error" or http_status in (401, 403):
        return "auth"
    if error_type == "quota_exceeded" or http_status == 402:
        return "quota"
    if error_type == "context_length_exceeded" or (
            error_type == "bad_request" and http_status in CALLER_FAULT_STATUSES):
        return "ignore"
    return "failure"


def admission(s: BreakerState, now_ms: int, cfg: BreakerConfig, fingerprint: str | None = None) -> Admission:
    """Whether a new call may go out at ``now_ms``: ``allow`` (closed, or auth-held under
    another configuration than ``fingerprint``), ``trial`` (half-open, or open with its
    deadline passed: the caller must hold a permit) or ``reject`` (open: fail fast)."""
    if s.hold == "auth" and fingerprint and s.fingerprint and fingerprint != s.fingerprint:
        return "allow"
    if s.state == "closed":
        return "allow"
    if s.state == "open" and now_ms < s.open_until_ms:
        return "reject"
    return "trial"


def _open_ms(s: BreakerState, cfg: BreakerConfig, retry_after_s: float | None) -> int:
    """Step 3: how long trip number ``s.trips + 1`` opens for (ms)."""
    backoff = min(cfg.max_open_ms, int(cfg.open_timeout_ms * cfg.backoff_factor ** s.trips))
    if retry_after_s:
        backoff = max(backoff, min(cfg.max_open_ms, int(retry_after_s * 1000)))
    return backoff


def _trip(s: BreakerState, at_ms: int, cfg: BreakerConfig, verdict: Verdict, trigger: str,
          reason: str, retry_after_s: float | None, fingerprint: str | None) -> tuple[BreakerState, Transition]:
    if verdict == "auth":
        until, hold = FOREVER_MS, "auth"
    elif verdict == "quota":
        until, hold = at_ms + cfg.quota_open_ms, "quota"
    else:
        until, hold = at_ms + _open_ms(s, cfg, retry_after_s), ""
    until = max(until, s.open_until_ms)  # never shorten a deadline
    new = replace(s, state="open", successes=0, opened_at_ms=at_ms, open_until_ms=until,
                  trips=s.trips + 1, window="", window_at="", reason=reason, hold=hold,  # type: ignore[arg-type]
                  fingerprint=(fingerprint or "") if verdict == "auth" else "")
    return new, Transition(s.state, "open", reason, new.failures, s.successes, trigger, until)


def apply_outcome(
    s: BreakerState, ok: bool, at_ms: int, cfg: BreakerConfig, *,
    latency_ms: float = 0.0, error_type: str | None = None, http_status: int | None = None,
    retry_after_s: float | None = None, fingerprint: str | None = None,
) -> tuple[BreakerState, list[Transition]]:
    """Apply one call outcome that happened at event time ``at_ms`` (steps 1-4, 6).

    ``latency_ms`` decides slowness, ``error_type``/``http_status`` the weight of a failure,
    ``retry_after_s`` (s) the open time, ``fingerprint`` the configuration the call ran under.
    Returns the new state and the transitions it caused, in order (at most three: a
    configuration change closes, an elapsed deadline half-opens, the outcome counts there).
    """
    verdict = classify(ok, error_type, http_status)
    transitions: list[Transition] = []
    if s.hold == "manual":
        return s, transitions
    if s.hold == "auth":
        if not fingerprint or fingerprint == s.fingerprint:
            return s, transitions
        reason = "configuration changed since the auth failure"
        transitions.append(Transition(s.state, "closed", reason, s.failures, s.successes,
                                      "config_changed"))
        s = BreakerState(reason=reason)
    if s.state == "open":
        if at_ms < s.open_until_ms:
            return _in_flight(s, verdict, at_ms, cfg, retry_after_s, fingerprint, transitions)
        s = replace(s, state="half_open", successes=0, reason="open timeout elapsed")
        transitions.append(Transition("open", "half_open", s.reason, s.failures, 0, "timeout_elapsed"))
    if verdict == "ignore":
        return s, transitions
    failed = verdict != "success"
    if s.state == "half_open":
        # a trial that answers, but slowly, proves nothing: it reopens (resilience4j evaluates
        # the slow-call rate over its half-open calls too)
        slow = not failed and latency_ms > cfg.slow_call_ms
        if failed or slow:
            s = replace(s, failures=s.failures + 1)
            trigger = ("half_open_slow_call" if slow else
                       "half_open_failure" if verdict == "failure" else verdict)
            why = (f"slow call ({latency_ms:.0f} ms > {cfg.slow_call_ms:.0f} ms)" if slow
                   else _what(verdict, error_type))
            s, t = _trip(s, at_ms, cfg, "failure" if slow else verdict, trigger,
                         f"{why} in half-open", retry_after_s, fingerprint)
            transitions.append(t)
            return s, transitions
        s = replace(s, successes=s.successes + 1)
        if s.successes >= cfg.success_threshold:
            reason = f"{s.successes} successes in half-open"
            transitions.append(Transition("half_open", "closed", reason, s.failures, s.successes,
                                          "half_open_successes"))
            s = BreakerState(reason=reason)
        return s, transitions
    # closed
    s = replace(s, failures=s.failures + 1 if failed else 0,
                **_slide(s, _WINDOW_CHARS[(failed, latency_ms > cfg.slow_call_ms)], at_ms, cfg))
    trip = _closed_trip(s, verdict, error_type, cfg)
    if trip is not None:
        s, t = _trip(s, at_ms, cfg, verdict, trip[0], trip[1], retry_after_s, fingerprint)
        transitions.append(t)
    return s, transitions


def _slide(s: BreakerState, entry: str, at_ms: int, cfg: BreakerConfig) -> dict[str, str]:
    """Step 2: the window with ``entry`` appended at ``at_ms``: the latest ``window_size``
    entries, and with ``window_ms`` only those after ``at_ms - window_ms``."""
    window = (s.window + entry)[-cfg.window_size:]
    if not cfg.window_ms:
        return {"window": window}
    times = [*(int(t) for t in s.window_at.split(",") if t), at_ms][-cfg.window_size:]
    keep = next(i for i, t in enumerate(times) if t > at_ms - cfg.window_ms)  # at_ms itself stays
    return {"window": window[keep:], "window_at": ",".join(map(str, times[keep:]))}


def _closed_trip(s: BreakerState, verdict: Verdict, error_type: str | None,
                 cfg: BreakerConfig) -> tuple[str, str] | None:
    """Step 2: the (trigger, reason) that trips a closed breaker after this outcome, if any."""
    if verdict in ("auth", "quota"):
        return verdict, _what(verdict, error_type)
    if s.failures >= cfg.failure_threshold:
        return "consecutive_failures", f"{s.failures} consecutive failures"
    n = len(s.window)
    if n >= cfg.minimum_calls:
        failed = sum(c in "xX" for c in s.window)
        if failed / n >= cfg.failure_rate:
            return "failure_rate", f"failure rate {failed}/{n} >= {cfg.failure_rate:.0%}"
        slow = sum(c in "sX" for c in s.window)
        if slow / n >= cfg.slow_call_rate:
            return ("slow_call_rate", (f"slow-call rate {slow}/{n} >= {cfg.slow_call_rate:.0%} "
                                       f"(calls over {cfg.slow_call_ms:.0f} ms)"))
    return None


def _in_flight(s: BreakerState, verdict: Verdict, at_ms: int, cfg: BreakerConfig,
               retry_after_s: float | None, fingerprint: str | None,
               transitions: list[Transition]) -> tuple[BreakerState, list[Transition]]:
    """Step 3: an outcome before the deadline (a call already in flight) only escalates: an auth
    or quota failure changes the hold, a longer Retry-After pushes the deadline later."""
    if verdict == "auth" and s.hold != "auth":
        reason = "auth error while open"
        s = replace(s, open_until_ms=FOREVER_MS, hold="auth", reason=reason, fingerprint=fingerprint or "")
        transitions.append(Transition("open", "open", reason, s.failures, 0, "auth", FOREVER_MS))
    elif verdict == "quota" and s.open_until_ms < at_ms + cfg.quota_open_ms:
        reason = "quota exceeded while open"
        s = replace(s, open_until_ms=at_ms + cfg.quota_open_ms, hold="quota", reason=reason)
        transitions.append(Transition("open", "open", reason, s.failures, 0, "quota", s.open_until_ms))
    elif verdict == "failure" and retry_after_s:
        until = at_ms + min(cfg.max_open_ms, int(retry_after_s * 1000))
        if until > s.open_until_ms:
            reason = f"Retry-After {retry_after_s:g} s while open"
            s = replace(s, open_until_ms=until, reason=reason)
            transitions.append(Transition("open", "open", reason, s.failures, 0, "retry_after", until))
    return s, transitions


def _what(verdict: Verdict, error_type: str | None) -> str:
    return {"auth": "auth error (401/403): open until the configuration changes or an operator closes it",
            "quota": "quota or payment error (402, insufficient_quota)"}.get(
        verdict, f"failure ({error_type or 'error'})")


def apply_command(s: BreakerState, command: Command, at_ms: int, reason: str = "",
                  operator: str = "") -> tuple[BreakerState, list[Transition]]:
    """Step 5: an operator's ``open``, ``close`` or ``reset`` at event time ``at_ms``. Always one
    transition, even when the state does not change: the command is on record."""
    why = f"manual {command}" + (f" by {operator}" if operator else "") + (f": {reason}" if reason else "")
    if command == "open":
        new = replace(s, state="open", successes=0, opened_at_ms=at_ms, open_until_ms=FOREVER_MS,
                      window="", window_at="", reason=why, hold="manual", fingerprint="")
    elif command == "close":
        new = BreakerState(trips=s.trips, reason=why)
    else:
        new = BreakerState(reason=why)
    return new, [Transition(s.state, new.state, why, s.failures, s.successes, f"manual_{command}",
                            new.open_until_ms if new.state == "open" else None)]


# ----------------------------------------------------------------- half-open permits (step 4)

TAKE_PERMITS = """
-- KEYS[1]: a half-open period's permit set (member: token, score: expiry in ms).
-- ARGV[1]: permits in all, ARGV[2]: now (ms), ARGV[3]: permit ttl (ms), ARGV[4..]: tokens wanted.
-- Drops expired permits, grants as many of the tokens as are left, returns the granted ones.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local left = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local granted = {}
local expiry = tonumber(ARGV[2]) + tonumber(ARGV[3])
for i = 4, #ARGV do
  if left <= 0 then break end
  redis.call('ZADD', KEYS[1], expiry, ARGV[i])
  granted[#granted + 1] = ARGV[i]
  left = left - 1
end
if #granted > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return granted
"""
"""One atomic script: no interleaving of processes can hold more than ``half_open_max_calls``
unexpired permits of one half-open period. ``now`` is the caller's wall clock (ephemeral
coordination, not projection state), so hosts' clocks must agree to well under the ttl."""

RETURN_PERMITS = """
-- KEYS[1]: a permit set; ARGV: the tokens given back unspent.
return redis.call('ZREM', KEYS[1], unpack(ARGV))
"""
