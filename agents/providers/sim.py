"""The ``sim`` provider kind: a simulated model for demos, load/chaos tests and policy studies.

SPEC §4 "Providers". A sim provider stands for a real model (``model``, also what its calls
are priced as) and behaves like one would on HumanEval-style tasks:

- **Answers.** For a code task it looks the prompt up in its answer book
  (:mod:`agents.providers.answers`). With probability ``accuracy`` (overall or per
  ``task_type``, the analyzer's feature the request carries) it returns the prompt plus the
  reference solution; otherwise a realistic wrong answer, by ``wrong_answer_mix``: an AST
  mutation of the reference (:mod:`agents.providers.mutations`) or a syntax error (a
  truncated answer). A prompt with no reference gets a stub body
  (``raise NotImplementedError``).
- **Calibration (code, HumanEval).** For the 164 HumanEval problems of the book the sim
  picks a mutation only among those recorded as failing the problem's tests (measured once,
  in the validator's sandbox, by :mod:`agents.providers.calibrate`; the sim itself runs
  nothing); a problem none of whose mutants fails gets a syntax error instead. So every
  wrong answer is wrong, every right answer (the canonical solution) passes, and a
  profile's expected pass rate on HumanEval is its **configured accuracy**: the mean over
  the problems of ``accuracy_for(task_type)`` of each problem's task_type (for a scalar
  ``accuracy``, that number). ``rmo calibrate`` measures the realised rate
  (:mod:`streams.calibrate`): within ±3 points of it over seeds 0-9, exactly 0 % at
  accuracy 0.0 and 100 % at 1.0. Only the book's HumanEval entries are calibrated:
  ``reference_file`` entries (and a HumanEval prompt whose solution a ``reference_file``
  replaces) get any mutant, some of which may still pass their tests.
- **Other kinds.** A json task is answered with one JSON document: its reference (a
  ``reference_file`` solution for the prompt), else an instance built from the request's
  JSON Schema (:func:`schema_instance`: the required properties with type-appropriate
  values); with probability ``1 - accuracy`` a wrong one instead, by ``wrong_answer_mix``:
  a mutation (a field dropped, given another type or another value) or a syntax error (the
  document cut short). The request never carries the task's expected values, so nothing
  leaks them. A text task gets a short fixed-form answer. The response never says whether
  the answer is right.
- **Latency** is drawn from a lognormal distribution fitted to ``latency_ms.mean`` and
  ``latency_ms.p95`` and actually awaited; ``mean: 0`` makes calls instant.
- **Faults.** With probability ``error_rate`` the call fails with HTTP 429 (Retry-After
  ``retry_after_s``) or a 5xx; with probability ``timeout_rate`` it hangs for
  ``timeout_after_ms`` and raises :class:`ProviderTimeout` (kept short so chaos runs stay
  fast; the executor's own 30 s timeout is for real providers).
- **Tokens and cost.** Token counts use the common ~4 characters per token rule of thumb
  for English text and code with BPE tokenizers (see :func:`estimate_tokens`); input is
  the prompt, output the generated completion. Cost comes from genai-prices for ``model``
  (:mod:`agents.providers.pricing`).

Every draw is seeded from SHA-256 of (seed, provider id, task id, attempt), one independent
stream per concern (fault, latency, answer), so the same request always gets the same
outcome, text, latency and tokens (given the shipped calibration data), and changing one
rate does not reshuffle the other draws. The answer draw is compared with ``accuracy``, so
raising a provider's accuracy only turns wrong answers into right ones, never the reverse.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agents.providers.answers import (
    AnswerBook,
    Reference,
    answer_prefix,
    human_eval_book,
    load_reference_file,
)
from agents.providers.base import (
    Provider,
    ProviderRequest,
    ProviderResponse,
    ProviderTimeout,
    RateLimited,
    ServerError,
)
from agents.providers.mutations import break_syntax, mutate, pick
from agents.providers.pricing import price_usd, resolve_model

CHARS_PER_TOKEN = 4
STUB_BODY = "    raise NotImplementedError\n"
_Z95 = NormalDist().inv_cdf(0.95)
# A lognormal's p95/mean ratio peaks at exp(z²/2) ≈ 3.87 (at sigma = z): larger ratios have
# no lognormal fit.
MAX_P95_OVER_MEAN = math.exp(_Z95**2 / 2)
# How an injected error splits: half rate limits, the rest spread over the usual 5xx codes.
_ERROR_STATUSES = (429, 429, 429, 500, 502, 503)


class LatencySpec(BaseModel):
    """Latency distribution in ms: a lognormal with this mean and 95th percentile."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean: float = Field(ge=0)
    p95: float = Field(ge=0)

    @model_validator(mode="after")
    def _fits_lognormal(self) -> LatencySpec:
        if self.mean > 0 and not self.mean <= self.p95 <= self.mean * MAX_P95_OVER_MEAN:
            raise ValueError(
                f"p95 must lie between mean and {MAX_P95_OVER_MEAN:.2f} × mean for a "
                f"lognormal fit (got mean={self.mean}, p95={self.p95})"
            )
        return self

    def lognormal_params(self) -> tuple[float, float]:
        """``(mu, sigma)`` of the lognormal with this mean and p95 (requires ``mean > 0``).

        mean = exp(mu + sigma²/2) and p95 = exp(mu + z·sigma) give
        sigma²/2 − z·sigma + ln(p95/mean) = 0; the smaller root is the fit.
        """
        gap = math.log(self.p95 / self.mean)
        sigma = _Z95 - math.sqrt(max(0.0, _Z95**2 - 2 * gap))
        return math.log(self.mean) - sigma**2 / 2, sigma


class WrongAnswerMix(BaseModel):
    """Relative weights of the kinds of wrong code or json answer (normalized; not all
    zero): ``mutation`` (code: an AST mutation; json: a field dropped, retyped or changed)
    and ``syntax_error`` (a truncated answer)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mutation: float = Field(default=0.85, ge=0)
    syntax_error: float = Field(default=0.15, ge=0)

    @model_validator(mode="after")
    def _not_all_zero(self) -> WrongAnswerMix:
        if self.mutation + self.syntax_error <= 0:
            raise ValueError("at least one weight must be positive")
        return self


class SimProviderConfig(BaseModel):
    """One ``kind: sim`` entry of the providers file (SPEC §4).

    ``accuracy`` is a probability, or a mapping task_type → probability that must have a
    ``"default"`` entry for the task types it does not list. Rates are probabilities per
    call, ``error_rate + timeout_rate ≤ 1``. ``timeout_after_ms`` is how long a simulated
    timeout hangs, ``retry_after_s`` the Retry-After of a simulated 429. ``reference_file``
    is an optional JSONL of extra ``{prompt, solution}`` references: for a code prompt the
    completion, for a json prompt the answer document (JSON text).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    kind: Literal["sim"] = "sim"
    model: str = Field(min_length=1)
    accuracy: float | dict[str, float]
    error_rate: float = Field(default=0.0, ge=0, le=1)
    timeout_rate: float = Field(default=0.0, ge=0, le=1)
    latency_ms: LatencySpec = LatencySpec(mean=0, p95=0)
    seed: int = 0
    wrong_answer_mix: WrongAnswerMix = WrongAnswerMix()
    timeout_after_ms: float = Field(default=200.0, ge=0)
    retry_after_s: float = Field(default=1.0, ge=0)
    reference_file: Path | None = None

    @field_validator("accuracy", mode="before")
    @classmethod
    def _check_accuracy(cls, value: object) -> object:
        # Checked by hand: pydantic's errors for a float-or-dict union list both branches.
        values = value.values() if isinstance(value, dict) else [value]
        if any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
            raise ValueError(
                f"expected a number in [0, 1] or a mapping task_type -> number, got {value!r}"
            )
        if any(not 0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"accuracy values must lie in [0, 1], got {value!r}")
        if isinstance(value, dict) and "default" not in value:
            raise ValueError(
                "an accuracy mapping needs a 'default' entry for the task types it does not list"
            )
        return value

    @model_validator(mode="after")
    def _check_rates(self) -> SimProviderConfig:
        if self.error_rate + self.timeout_rate > 1.0:
            raise ValueError("error_rate + timeout_rate must not exceed 1")
        return self

    def accuracy_for(self, task_type: str) -> float:
        """The probability of a right answer for a task of ``task_type``."""
        if isinstance(self.accuracy, dict):
            return self.accuracy.get(task_type, self.accuracy["default"])
        return self.accuracy


def estimate_tokens(text: str) -> int:
    """Token count of ``text`` at ~4 characters per token, rounded up.

    The rule of thumb OpenAI and Anthropic give for English text with their BPE tokenizers;
    code is close to it. Good enough for budgets and costs of simulated calls.
    """
    return math.ceil(len(text) / CHARS_PER_TOKEN)


class SimProvider(Provider):
    """A simulated provider (see the module docstring). Thread-safe; holds no mutable state."""

    kind = "sim"

    def __init__(self, config: SimProviderConfig, answers: AnswerBook | None = None) -> None:
        """Build from ``config``. ``answers`` replaces the HumanEval answer book (tests).

        Raises ValueError if genai-prices has no price for ``config.model``, OSError or
        ValueError if ``config.reference_file`` cannot be read.
        """
        resolve_model(config.model)
        self.config = config
        self.id = config.id
        self.model = config.model
        book = human_eval_book() if answers is None else answers
        if config.reference_file is not None:
            book = book.merged(load_reference_file(config.reference_file))
        self._book = book
        mean = config.latency_ms.mean
        self._latency_params = config.latency_ms.lognormal_params() if mean > 0 else None

    async def complete(self, request: ProviderRequest) -> ProviderResponse:
        """Answer ``request`` after the simulated latency, or raise a simulated fault.

        Raises :class:`RateLimited` (429, no cost), :class:`ServerError` (5xx, no cost) or
        :class:`ProviderTimeout` (billed for the prompt's input tokens: the provider
        processed it even though no answer arrived).
        """
        latency_ms = self._latency_ms(request)
        input_tokens = estimate_tokens(request.prompt)
        faults = self._rng(request, "fault")
        draw = faults.random()
        if draw < self.config.error_rate:
            await _sleep_ms(latency_ms)
            status = faults.choice(_ERROR_STATUSES)
            if status == 429:
                raise RateLimited(
                    f"{self.id}: simulated 429 Too Many Requests",
                    http_status=429,
                    retry_after_s=self.config.retry_after_s,
                    latency_ms=latency_ms,
                )
            raise ServerError(
                f"{self.id}: simulated HTTP {status}", http_status=status, latency_ms=latency_ms
            )
        if draw < self.config.error_rate + self.config.timeout_rate:
            timeout_ms = self.config.timeout_after_ms
            await _sleep_ms(timeout_ms)
            raise ProviderTimeout(
                f"{self.id}: simulated timeout after {timeout_ms:g} ms",
                latency_ms=timeout_ms,
                input_tokens=input_tokens,
                cost_usd=price_usd(self.model, input_tokens, 0),
            )
        prefix, completion = self._answer(request)
        # A real model stops at its output limit, mid-answer if need be.
        completion = completion[: request.max_output_tokens * CHARS_PER_TOKEN]
        output_tokens = estimate_tokens(completion)
        await _sleep_ms(latency_ms)
        return ProviderResponse(
            text=prefix + completion,
            model=self.model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=price_usd(self.model, input_tokens, output_tokens),
            latency_ms=latency_ms,
        )

    def _rng(self, request: ProviderRequest, stream: str) -> random.Random:
        key = "\x1f".join(
            (str(self.config.seed), self.id, request.task_id, str(request.attempt), stream)
        )
        return random.Random(hashlib.sha256(key.encode("utf-8")).digest())

    def _latency_ms(self, request: ProviderRequest) -> float:
        if self._latency_params is None:
            return 0.0
        mu, sigma = self._latency_params
        return self._rng(request, "latency").lognormvariate(mu, sigma)

    def _answer(self, request: ProviderRequest) -> tuple[str, str]:
        """``(prefix, completion)``: the response text is their concatenation."""
        if request.kind == "text":
            return "", _text_answer(request.prompt)
        if request.kind == "json":
            return "", self._json_answer(request)
        prefix = answer_prefix(request.prompt)
        reference = self._book.reference(request.prompt)
        if reference is None:
            return prefix, STUB_BODY
        rng = self._rng(request, "answer")
        if rng.random() < self.config.accuracy_for(request.task_type):
            return prefix, reference.solution
        return prefix, self._wrong_completion(prefix, reference, rng)

    def _wrong_completion(self, prefix: str, reference: Reference, rng: random.Random) -> str:
        module = prefix + reference.solution
        mix = self.config.wrong_answer_mix
        wants_mutation = rng.random() * (mix.mutation + mix.syntax_error) < mix.mutation
        mutant = None
        if wants_mutation and reference.failing is None:  # uncalibrated: any mutant
            mutant = mutate(module, rng, region_start=len(prefix))
        elif wants_mutation:
            chosen = pick(reference.failing, rng)
            mutant = None if chosen is None else chosen.apply(module)
        # References without a (failing) mutant, e.g. ``return "".join(xs)``, get a syntax
        # error: the one wrong answer that is wrong by construction.
        wrong = mutant if mutant is not None else break_syntax(module, rng, len(prefix))
        return wrong[len(prefix) :]

    def _json_answer(self, request: ProviderRequest) -> str:
        """The reference document for the prompt, else :func:`schema_instance` of the
        request's schema; a wrong one (:func:`_wrong_json`) with probability 1 - accuracy."""
        reference = self._book.solution(request.prompt)
        right = (reference.strip() if reference is not None
                 else json.dumps(schema_instance(request.json_schema)))
        rng = self._rng(request, "answer")
        if rng.random() < self.config.accuracy_for(request.task_type):
            return right
        return _wrong_json(right, rng, self.config.wrong_answer_mix)


#: Values a model would write for common string formats (validation asserts ``format``).
_FORMAT_EXAMPLES = {
    "date": "2024-01-01", "date-time": "2024-01-01T00:00:00Z", "time": "00:00:00Z",
    "email": "user@example.com", "uri": "https://example.com/", "hostname": "example.com",
    "ipv4": "192.0.2.1", "ipv6": "2001:db8::1", "uuid": "00000000-0000-0000-0000-000000000000",
}
_MAX_SCHEMA_DEPTH = 32


def schema_instance(schema: object, depth: int = 0) -> Any:
    """A plausible JSON value for ``schema`` (None: an empty object), as a model that read
    only the schema would write: ``const``, else the first ``enum`` value, else ``default``,
    else by ``type`` -- an object of the ``required`` properties, an array of ``minItems``
    items, the empty string (or ``minLength`` x's, or an example of its ``format``), 0 (or
    the nearest value within ``minimum`` / ``maximum``), false, null. ``anyOf`` / ``oneOf``
    / ``allOf`` take their first branch. Valid for schemas built from these keywords;
    ``pattern``, ``$ref`` and the like are not solved (the validator says so). Deterministic;
    nesting deeper than 32 levels gives null."""
    if schema is None:
        return {}
    if not isinstance(schema, dict) or depth > _MAX_SCHEMA_DEPTH:
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for combinator in ("anyOf", "oneOf", "allOf"):
        if schema.get(combinator):
            return schema_instance(schema[combinator][0], depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((t for t in kind if t != "null"), "null")
    if kind is None:
        kind = ("object" if "properties" in schema or "required" in schema
                else "array" if "items" in schema else "null")
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: schema_instance(properties.get(name, {}), depth + 1)
                for name in schema.get("required", [])}
    if kind == "array":
        return [schema_instance(schema.get("items", {}), depth + 1)
                for _ in range(schema.get("minItems", 0))]
    if kind == "string":
        return _FORMAT_EXAMPLES.get(schema.get("format"), "x" * schema.get("minLength", 0))
    if kind in ("integer", "number"):
        return _number_within(schema)
    if kind == "boolean":
        return False
    return None


def _number_within(schema: dict) -> int | float:
    """0, moved to the nearest integer the bounds allow (``exclusive*`` bounds by one)."""
    value: int | float = 0
    if "minimum" in schema and value < schema["minimum"]:
        value = math.ceil(schema["minimum"])
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        value = math.floor(schema["exclusiveMinimum"]) + 1
    if "maximum" in schema and value > schema["maximum"]:
        value = math.floor(schema["maximum"])
    if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
        value = math.ceil(schema["exclusiveMaximum"]) - 1
    return value


def _wrong_json(right: str, rng: random.Random, mix: WrongAnswerMix) -> str:
    """A wrong variant of the JSON text ``right``: by ``mix``, a mutation of one top-level
    field or element (dropped, given another JSON type, or another value of its type) or
    the document cut short (not JSON). ``right`` that does not parse is always cut short."""
    wants_mutation = rng.random() * (mix.mutation + mix.syntax_error) < mix.mutation
    try:
        document = json.loads(right)
    except ValueError:
        wants_mutation = False
    if not wants_mutation:
        return right[: len(right) // 2] or "{"
    how = rng.choice(("drop", "retype", "change"))
    if isinstance(document, dict) and document:
        key = rng.choice(list(document))
        if how == "drop":
            del document[key]
        else:
            document[key] = _retyped(document[key]) if how == "retype" else _changed(document[key])
    elif isinstance(document, list) and document:
        index = rng.randrange(len(document))
        if how == "drop":
            del document[index]
        else:
            document[index] = (_retyped(document[index]) if how == "retype"
                               else _changed(document[index]))
    else:
        document = _retyped(document) if how == "retype" else _changed(document)
    return json.dumps(document)


def _retyped(value: Any) -> Any:
    """``value`` as another JSON type: a string becomes 0, anything else its JSON text."""
    return 0 if isinstance(value, str) else json.dumps(value)


def _changed(value: Any) -> Any:
    """Another value of ``value``'s type (strings lose their last character, numbers gain
    one, booleans flip, containers empty or get one null); null becomes 0."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value[:-1] if value else "?"
    if isinstance(value, dict | list):
        return type(value)() if value else [None] if isinstance(value, list) else {"": None}
    return 0


def _text_answer(prompt: str) -> str:
    """A short answer that restates the prompt's first sentence (at most 160 characters)."""
    first = prompt.strip().split("\n", 1)[0].split(". ", 1)[0][:160]
    return f"Answer: {first}" if first else "Answer: (empty prompt)"


async def _sleep_ms(ms: float) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000)
