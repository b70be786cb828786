"""The provider interface every kind implements (SPEC §4 "Providers").

A provider turns a :class:`ProviderRequest` into a :class:`ProviderResponse` or raises a
:class:`ProviderError`. Both carry what the executor needs for its ``ProviderCallCompleted``
and ``ProviderCallFailed`` events (models/events.py): model, latency in ms, token counts and
cost in USD. Neither carries a verdict on the answer: only the validator decides whether an
answer is right (SPEC §4).

Real adapters (``openai``, ``anthropic``) and the ``replay`` kind implement the same
:class:`Provider` base, so the executor never needs to know which kind it is calling.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

from agents.providers.pricing import price_per_mtok

DEFAULT_MAX_OUTPUT_TOKENS = 1024
"""The answer cap of a call (tokens) unless a rule raises it (agents/rules.py)."""


@dataclass(frozen=True)
class ProviderRequest:
    """One call to a provider.

    ``prompt`` is the task text as submitted; for code tasks (``kind == "code"``) it is a
    Python module prefix (signature and docstring) that the answer completes, and
    ``entry_point`` names the function to define. For ``json`` tasks ``json_schema`` is the
    JSON Schema the answer must satisfy (a structured-output mode uses it where the endpoint
    has one). ``task_type`` is the analyzer's feature (e.g. ``"string"``, ``"math"``).
    ``attempt`` counts retries from 0. ``max_output_tokens`` caps the answer length in tokens.
    """

    task_id: str
    prompt: str
    kind: Literal["code", "json", "text"]
    entry_point: str | None
    task_type: str
    attempt: int = 0
    max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS
    json_schema: dict | None = None


@dataclass(frozen=True)
class ProviderResponse:
    """A successful call.

    ``text``: for code tasks, a full module (prompt + completion) defining the entry point;
    for text tasks, the answer. ``model`` is the model that answered (and is priced).
    Tokens are counts, ``cost_usd`` is in US dollars, ``latency_ms`` in milliseconds.
    """

    text: str
    model: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    latency_ms: float


class ProviderError(Exception):
    """A failed call, with what it still cost.

    ``error_type`` is a short machine-readable tag (the ``error_type`` of
    ``ProviderCallFailed``), ``http_status`` the HTTP status if there was one,
    ``retry_after_s`` the server's Retry-After in seconds if it sent one. Latency in ms,
    tokens as counts, ``cost_usd`` in USD (what the provider bills for the failed call).
    """

    error_type: ClassVar[str] = "provider_error"
    retryable: ClassVar[bool] = False
    """True when the same call may succeed if repeated (rate limits, 5xx, timeouts, lost
    connections); False when repeating cannot help (auth, a bad request, context too long)."""

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        retry_after_s: float | None = None,
        latency_ms: float = 0.0,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cost_usd: float = 0.0,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.retry_after_s = retry_after_s
        self.latency_ms = latency_ms
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.cost_usd = cost_usd


class RateLimited(ProviderError):
    """HTTP 429: the provider asks us to back off for ``retry_after_s`` seconds."""

    error_type: ClassVar[str] = "rate_limited"
    retryable: ClassVar[bool] = True


class ServerError(ProviderError):
    """HTTP 5xx (500, 502, 503, 504), 408 Request Timeout or 409 Conflict: the provider
    failed; a retry may succeed. (OpenAI's and Anthropic's SDKs retry exactly these statuses
    by default; we turn their retries off and let the executor decide.)"""

    error_type: ClassVar[str] = "server_error"
    retryable: ClassVar[bool] = True


class Overloaded(ServerError):
    """The provider is temporarily overloaded: Anthropic's HTTP 529 ``overloaded_error``
    (https://docs.anthropic.com/en/api/errors). Retryable, like every :class:`ServerError`."""

    error_type: ClassVar[str] = "overloaded"


class ProviderTimeout(ProviderError):
    """No answer in time. ``http_status`` is None: there was no HTTP response."""

    error_type: ClassVar[str] = "timeout"
    retryable: ClassVar[bool] = True


class ConnectionFailed(ProviderError):
    """No HTTP response at all: connection refused or reset, DNS failure, TLS failure.
    ``http_status`` is None. Retryable: a restarting local server (Ollama, vLLM) comes back."""

    error_type: ClassVar[str] = "connection_failed"
    retryable: ClassVar[bool] = True


class MalformedResponse(ProviderError):
    """HTTP 200 whose body is not the protocol's shape (not JSON, no choices / content).
    Retryable: proxies and overloaded servers send such bodies transiently. Tokens and cost
    are filled when the body still carried a usage block."""

    error_type: ClassVar[str] = "malformed_response"
    retryable: ClassVar[bool] = True


class AuthError(ProviderError):
    """HTTP 401/403: the API key was missing, wrong or lacks permission. Not retryable. The
    message names the environment variable to set, never the key."""

    error_type: ClassVar[str] = "auth_error"


class QuotaExceeded(ProviderError):
    """The account is out of credit: OpenAI's HTTP 429 with code ``insufficient_quota``,
    Anthropic's HTTP 402 ``billing_error``. Not retryable: waiting does not add credit."""

    error_type: ClassVar[str] = "quota_exceeded"


class ContextLengthExceeded(ProviderError):
    """HTTP 400 because prompt plus requested output exceed the model's context window
    (OpenAI code ``context_length_exceeded``, Anthropic "prompt is too long"). Not
    retryable: the same request fails the same way."""

    error_type: ClassVar[str] = "context_length_exceeded"


class BadRequest(ProviderError):
    """Any other HTTP 4xx (400 invalid request, 404 unknown model, 413, 422): the request
    itself is wrong. Not retryable."""

    error_type: ClassVar[str] = "bad_request"


ERROR_CLASSES: dict[str, type[ProviderError]] = {
    cls.error_type: cls
    for cls in (
        ProviderError,
        RateLimited,
        ServerError,
        Overloaded,
        ProviderTimeout,
        ConnectionFailed,
        MalformedResponse,
        AuthError,
        QuotaExceeded,
        ContextLengthExceeded,
        BadRequest,
    )
}
"""Every error class by its ``error_type``, e.g. to re-raise a recorded failure as its kind."""


class Provider(ABC):
    """A configured model endpoint.

    ``id`` is the provider's name in the registry (the routing action), ``model`` the model
    it calls and is priced as, ``kind`` the registry kind that built it (``"sim"``,
    ``"openai"``, ``"anthropic"``, ``"replay"``).
    """

    kind: ClassVar[str]
    id: str
    model: str

    @abstractmethod
    async def complete(self, request: ProviderRequest) -> ProviderResponse:
        """Answer ``request``.

        Raises :class:`RateLimited`, :class:`ServerError`, :class:`ProviderTimeout` or
        another :class:`ProviderError` when the call fails. Never retries: the executor's
        retry policy is the only retry loop (``exc.retryable``, ``exc.retry_after_s``).
        """

    def price_per_mtok(self) -> tuple[float, float] | None:
        """``(input, output)`` list price in USD per million tokens this provider's calls are
        charged at, or None when the model is unpriced (its calls cost 0). The default is
        genai-prices' price for ``model``; kinds with a price override return the override."""
        return price_per_mtok(self.model)

    @property
    def priced(self) -> bool:
        """False when calls are counted as costing 0 because no price is known."""
        return self.price_per_mtok() is not None

    def endpoint(self) -> str | None:
        """The base URL calls go to; None for kinds that call nothing over the network."""
        return None

    async def aclose(self) -> None:
        """Release connections (the HTTP kinds close their SDK client). Default: nothing."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, model={self.model!r})"
