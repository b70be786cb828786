"""What the HTTP kinds (``openai``, ``anthropic``) share: the entry fields, API keys, the
HTTP status → :class:`ProviderError` mapping, Retry-After, pricing and answer rendering.

Keys: an entry names an environment variable (``api_key_env``); the key is read from it
when the provider is built and handed straight to the SDK client, which is the only place
that holds it (its ``repr`` does not show it). No field of the provider or its config
holds it, so it cannot reach a ``repr``, a config dump or fingerprint, an event or a log
line; error messages are built by us (never the SDK's, which quote the server's body)
and scrubbed of the key all the same.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agents.providers.base import (
    AuthError,
    BadRequest,
    ConnectionFailed,
    ContextLengthExceeded,
    MalformedResponse,
    Overloaded,
    Provider,
    ProviderError,
    ProviderRequest,
    ProviderResponse,
    ProviderTimeout,
    QuotaExceeded,
    RateLimited,
    ServerError,
)
from agents.providers.extract import clean_text, extract_code, extract_json
from agents.providers.pricing import PriceOverride, Pricer
from streams.logs import register_secrets

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
"""What an environment variable name looks like (POSIX portable names). A value that does
not match is most likely a key pasted where its variable's name belongs."""

CONTEXT_LENGTH = re.compile(
    r"context[_ ]length|context window|context limit|maximum context|context size"
    r"|prompt is too long|too many tokens",
    re.IGNORECASE,
)
"""Error messages of a prompt that does not fit, where no error code says so: vLLM's
"This model's maximum context length is …", llama.cpp's "the request exceeds the available
context size", Anthropic's "prompt is too long: N tokens > M maximum" and "input length and
`max_tokens` exceed context limit" (https://docs.anthropic.com/en/api/errors)."""

MESSAGE_CAP = 300
"""Characters of a server's error message kept in ours (the executor keeps 500)."""

Shape = TypeVar("Shape", bound=BaseModel)


class HTTPProviderConfig(BaseModel):
    """Fields every HTTP kind's entry takes (see the kinds for their extra fields).

    ``base_url``: the endpoint (None: the SDK's default, i.e. OpenAI's or Anthropic's API).
    ``api_key_env``: the NAME of the environment variable that holds the API key.
    ``timeout_s``: the SDK client's timeout in seconds (httpx applies it to connecting and
    to each read and write; the executor enforces its own overall timeout too). ``max_output_tokens``: a cap on answer tokens for this
    endpoint (the request's own cap applies too; the smaller wins). ``temperature``: sent
    when set. ``price``: USD per million tokens, instead of genai-prices' list price.
    ``structured_output``: JSON tasks use the endpoint's structured-output mode (False:
    the schema goes into the instructions, for endpoints without one).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    model: str = Field(min_length=1)
    base_url: str | None = None
    api_key_env: str | None = None
    timeout_s: float = Field(default=30.0, gt=0)
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    price: PriceOverride | None = None
    structured_output: bool = True


def read_api_key(env_name: str | None, *, example: str) -> str | None:
    """The API key held by the environment variable ``env_name`` (None: no variable named,
    no key). ``example`` is a variable name shown in the error for a malformed name.

    Raises ValueError (the registry reports it as a ``ProviderConfigError``) naming the
    variable when it is unset or empty, or when ``env_name`` does not look like a variable
    name; the message never contains the value.
    """
    if env_name is None:
        return None
    if not ENV_NAME.match(env_name):
        raise ValueError(
            "field 'api_key_env': expected the NAME of an environment variable that holds "
            f"the key (e.g. {example}), not the key itself (the value is not shown)"
        )
    key = os.environ.get(env_name, "").strip()
    if not key:
        raise ValueError(
            f"field 'api_key_env': environment variable {env_name} is not set "
            f"(export {env_name}=<your API key>)"
        )
    register_secrets([key])  # masked in every log line of this process from now on
    return key


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asks us to wait, from ``retry-after-ms`` (milliseconds; sent by
    OpenAI and Azure OpenAI, read first like the OpenAI SDK does) or ``retry-after``
    (delay-seconds or an HTTP-date, RFC 9110 §10.2.3). None when absent or unreadable."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            ms = float(raw_ms)
        except ValueError:
            ms = math.nan
        if math.isfinite(ms) and ms >= 0:
            return ms / 1000
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def status_error_class(
    status: int, *, overloaded: bool, quota: bool, context_length: bool
) -> type[ProviderError]:
    """The error class for an HTTP error ``status``, given what the body said: the
    provider is ``overloaded``, the account is out of ``quota``, the prompt exceeds the
    ``context_length``. Mapping: 401/403 auth; quota; 429 rate limit; 529 or overloaded;
    408, 409 and 5xx server errors (retryable; the statuses the OpenAI and Anthropic SDKs
    retry); a context-length 4xx; any other 4xx a bad request."""
    if status in (401, 403):
        return AuthError
    if quota:
        return QuotaExceeded
    if status == 429:
        return RateLimited
    if overloaded or status == 529:
        return Overloaded
    if status in (408, 409) or status >= 500:
        return ServerError
    if context_length:
        return ContextLengthExceeded
    return BadRequest


def usage_counts(usage: Any, input_key: str, output_key: str) -> tuple[int, int]:
    """``(input, output)`` token counts from a usage block (0 for what it lacks)."""
    if not isinstance(usage, dict):
        return 0, 0
    counts = []
    for key in (input_key, output_key):
        value = usage.get(key)
        counts.append(value if isinstance(value, int) and value >= 0 else 0)
    return counts[0], counts[1]


def render_answer(request: ProviderRequest, text: str, structured: str | None) -> str:
    """The ``ProviderResponse.text`` for a model's answer: for code, a module defining the
    entry point (:func:`~agents.providers.extract.extract_code`); for json, the structured
    answer's JSON text if there is one, else the JSON found in ``text``; for text, the
    cleaned answer."""
    if request.kind == "code":
        return extract_code(text, request.prompt, request.entry_point)
    if request.kind == "json":
        return structured if structured is not None else extract_json(text)
    return clean_text(text)


class HTTPProvider(Provider):
    """Base of the HTTP kinds: config, pricing, token caps, the call with its error
    mapping, response and error building.

    Subclasses set the SDK's exception classes, implement :meth:`new_client` (the SDK
    client, its own retries off), :meth:`status_error` and :meth:`complete`, and call
    ``super().__init__(config, key)``.

    One client per provider is reused for every call, so its connections are pooled. The
    pool belongs to the event loop of its first call (the SDKs' httpx transport binds
    connections to it), so a call on another loop (a CLI check under ``asyncio.run`` and
    then the worker's loop) gets a fresh client: :meth:`client`.
    """

    kind: ClassVar[str]
    default_key_env: ClassVar[str]
    """The conventional variable name, shown in error messages as an example."""
    timeout_error: ClassVar[type[Exception]]
    """The SDK's timeout error (a subclass of ``connection_error`` in both SDKs, so it is
    caught first)."""
    connection_error: ClassVar[type[Exception]]
    """The SDK's error for a request that got no HTTP response."""
    http_error: ClassVar[type[Exception]]
    """The SDK's error for an HTTP 4xx/5xx response."""
    _client: Any
    """The SDK client (``openai.AsyncOpenAI`` / ``anthropic.AsyncAnthropic``)."""

    def __init__(self, config: HTTPProviderConfig, key: str | None) -> None:
        self.config = config
        self.id = config.id
        self.model = config.model
        self._pricer = Pricer(config.id, config.model, config.price)
        self._client = self.new_client(key)
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def new_client(self, key: str | None) -> Any:
        """A new SDK client calling ``config.base_url`` with ``key`` (None: no key)."""
        raise NotImplementedError

    def client(self) -> Any:
        """The SDK client for the running event loop (see the class docstring)."""
        loop = asyncio.get_running_loop()
        if self._client_loop is not loop:
            if self._client_loop is not None:
                # The old client's connections live on another (maybe closed) loop: drop it
                # unclosed, closing would need that loop.
                self._client = self.new_client(self._client.api_key)
            self._client_loop = loop
        return self._client

    def price_per_mtok(self) -> tuple[float, float] | None:
        """The entry's ``price`` override, else genai-prices' price for ``model``, else None."""
        return self._pricer.per_mtok()

    def max_tokens(self, request: ProviderRequest) -> int:
        """The answer's token cap: the request's, lowered to the entry's if that is smaller."""
        cap = self.config.max_output_tokens
        return min(request.max_output_tokens, cap) if cap else request.max_output_tokens

    def endpoint(self) -> str:
        """The base URL calls go to, for messages."""
        return str(self._client.base_url)

    def scrub(self, text: str) -> str:
        """``text`` without the API key (defence in depth: servers may echo it). The key is
        read from the SDK client, the only holder of it."""
        secret = self._client.api_key
        return text.replace(secret, "***") if secret else text

    def status_error(self, exc: Any, started: float) -> ProviderError:
        """The ProviderError for the SDK's HTTP-status exception ``exc``."""
        raise NotImplementedError

    async def send(
        self, create: Callable[..., Awaitable[Any]], params: dict[str, Any], started: float
    ) -> tuple[Any, int]:
        """Call the SDK's ``with_raw_response.create(**params)``; ``(decoded JSON body,
        HTTP status)``. Raises :class:`ProviderTimeout`, :class:`ConnectionFailed`, the
        :meth:`status_error` of an HTTP error, or :class:`MalformedResponse` for a body
        that is not JSON."""
        try:
            raw = await create(**params)
        except self.timeout_error:
            raise self.error(
                ProviderTimeout, f"no response within {self.config.timeout_s:g} s", started=started
            ) from None
        except self.connection_error as exc:
            cause = exc.__cause__ or exc.__context__  # the SDK's own message is generic
            reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)
            raise self.error(
                ConnectionFailed, f"cannot reach {self.endpoint()}: {reason}", started=started
            ) from None
        except self.http_error as exc:
            raise self.status_error(exc, started) from None
        status = raw.http_response.status_code
        try:
            return json.loads(raw.http_response.content), status
        except ValueError:
            content_type = raw.http_response.headers.get("content-type", "no content type")
            raise self.error(
                MalformedResponse,
                f"HTTP {status} with a body that is not JSON ({content_type})",
                started=started,
                http_status=status,
            ) from None

    def validate(
        self,
        body: Any,
        shape: type[Shape],
        *,
        status: int,
        usage_keys: tuple[str, str],
        started: float,
    ) -> tuple[Shape, int, int]:
        """``(body as shape, input tokens, output tokens)``; tokens from the body's
        ``usage`` block under ``usage_keys``. Raises :class:`MalformedResponse` (with the
        tokens, if the usage block was there) when the body does not fit ``shape``."""
        usage = body.get("usage") if isinstance(body, dict) else None
        input_tokens, output_tokens = usage_counts(usage, *usage_keys)
        try:
            return shape.model_validate(body), input_tokens, output_tokens
        except ValidationError as exc:
            first = ".".join(map(str, exc.errors()[0]["loc"])) or "the top level"
            model = body.get("model") if isinstance(body, dict) else None
            raise self.error(
                MalformedResponse,
                f"HTTP {status} body is not the protocol's shape ({exc.error_count()} "
                f"problem(s), first at {first}: {exc.errors()[0]['msg']})",
                started=started,
                http_status=status,
                model=model if isinstance(model, str) else None,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
            ) from None

    def response(
        self,
        request: ProviderRequest,
        *,
        text: str,
        structured: str | None,
        model: str | None,
        input_tokens: int,
        output_tokens: int,
        started: float,
    ) -> ProviderResponse:
        """The :class:`ProviderResponse` of a successful call started at ``started``
        (``time.perf_counter()``); ``model`` is the response's model field."""
        return ProviderResponse(
            text=render_answer(request, text, structured),
            model=model or self.model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=self._pricer.cost_usd(model, input_tokens, output_tokens),
            latency_ms=elapsed_ms(started),
        )

    def error(
        self,
        cls: type[ProviderError],
        detail: str,
        *,
        started: float,
        http_status: int | None = None,
        retry_after: float | None = None,
        model: str | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> ProviderError:
        """A ``cls`` error for a call started at ``started``, its message prefixed with the
        provider id and scrubbed of the key; tokens (counts) are priced like a success."""
        if cls is AuthError:
            detail += f"; {self.auth_hint(http_status)}"
        return cls(
            self.scrub(f"{self.id}: {detail}"),
            http_status=http_status,
            retry_after_s=retry_after,
            latency_ms=elapsed_ms(started),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_usd=self._pricer.cost_usd(model, input_tokens, output_tokens),
        )

    def auth_hint(self, http_status: int | None) -> str:
        """What to do about an authentication failure (HTTP 401, or 403: a valid key without
        permission): the variable to set, never the key."""
        env = self.config.api_key_env
        if env is None:
            return (
                f"this entry sends no API key: set api_key_env to the name of the environment "
                f"variable that holds the key for {self.endpoint()} (e.g. {self.default_key_env})"
            )
        if http_status == 403:
            return (
                f"the key in {env} lacks permission for model {self.model!r}: set {env} to a "
                f"key that has it"
            )
        return f"set {env} to a valid API key for {self.endpoint()}"

    def http_status_error(
        self,
        cls: type[ProviderError],
        *,
        status: int,
        kind: str | None,
        message: str | None,
        headers: Mapping[str, str],
        started: float,
    ) -> ProviderError:
        """The ``cls`` error for an HTTP error response: ``HTTP 429 rate_limit_exceeded:
        <server message, shortened>`` (the server's message is left out of auth errors:
        OpenAI's quotes the key, masked), with the Retry-After of ``headers``."""
        detail = f"HTTP {status}" + (f" {kind}" if kind else "")
        if message and cls is not AuthError:
            # Scrubbed before shortening: a cut could leave a piece of the key unmatched.
            detail += f": {self.scrub(message)[:MESSAGE_CAP]}"
        return self.error(
            cls, detail, started=started, http_status=status, retry_after=retry_after_s(headers)
        )

    async def aclose(self) -> None:
        """Close the SDK client's connection pool (call it on the loop that used it)."""
        await self._client.close()


def elapsed_ms(started: float) -> float:
    """Milliseconds since ``started`` (a ``time.perf_counter()`` reading)."""
    return (time.perf_counter() - started) * 1000
