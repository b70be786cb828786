"""The ``sim`` provider kind: a simulated model for demos, load/chaos tests and policy studies.

SPEC §4 "Providers". A sim provider stands for a real model (``model``, also what its calls
are priced as) and behaves like one would on HumanEval-style tasks:

- **Answers.** For a code task it looks the prompt up in its answer book
  (:mod:`agents.providers.answers`). With probability ``accuracy`` (overall or per
  ``task_type``) it returns the prompt plus the reference solution; otherwise a realistic
  wrong answer, by ``wrong_answer_mix``: an AST mutation of the reference
  (:mod:`agents.providers.mutations`) or a syntax error (a truncated answer). A prompt
  with no reference gets a stub body (``raise NotImplementedError``). A text task gets a
  short fixed-form answer. The response never says whether the answer is right.
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
outcome, text, latency and tokens, and changing one rate does not reshuffle the other draws.
The answer draw is compared with ``accuracy``, so raising a provider's accuracy only turns
wrong answers into right ones, never the reverse.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from pathlib import Path
from statistics import NormalDist
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agents.providers.answers import AnswerBook, human_eval_book, load_reference_file
from agents.providers.base import (
    Provider,
    ProviderRequest,
    ProviderResponse,
    ProviderTimeout,
    RateLimited,
    ServerError,
)
from agents.providers.mutations import break_syntax, mutate
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
    """Relative weights of the kinds of wrong code answer (normalized; not all zero)."""

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
    is an optional JSONL of extra ``{prompt, solution}`` references.
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
        prefix = request.prompt if request.prompt.endswith("\n") else request.prompt + "\n"
        solution = self._book.solution(request.prompt)
        if solution is None:
            return prefix, STUB_BODY
        rng = self._rng(request, "answer")
        if rng.random() < self.config.accuracy_for(request.task_type):
            return prefix, solution
        return prefix, self._wrong_completion(prefix, solution, rng)

    def _wrong_completion(self, prefix: str, solution: str, rng: random.Random) -> str:
        module = prefix + solution
        mix = self.config.wrong_answer_mix
        wants_mutation = rng.random() * (mix.mutation + mix.syntax_error) < mix.mutation
        mutant = mutate(module, rng, region_start=len(prefix)) if wants_mutation else None
        # Solutions too small to mutate (e.g. ``return "".join(xs)``) get a syntax error.
        wrong = mutant if mutant is not None else break_syntax(module, rng, len(prefix))
        return wrong[len(prefix) :]


def _text_answer(prompt: str) -> str:
    """A short answer that restates the prompt's first sentence (at most 160 characters)."""
    first = prompt.strip().split("\n", 1)[0].split(". ", 1)[0][:160]
    return f"Answer: {first}" if first else "Answer: (empty prompt)"


async def _sleep_ms(ms: float) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000)
