"""Kind ``openai``: any OpenAI-compatible chat-completions endpoint (SPEC §4 "Providers").

One kind covers OpenAI, xAI Grok (``https://api.x.ai/v1``), Gemini's OpenAI-compatible
endpoint (``https://generativelanguage.googleapis.com/v1beta/openai/``), Ollama
(``http://localhost:11434/v1``), vLLM, the llama.cpp server and LM Studio, through
``base_url``. Calls go through the official ``openai`` SDK (``AsyncOpenAI``,
``POST {base_url}/chat/completions``, https://platform.openai.com/docs/api-reference/chat)::

    providers:
      - id: gpt
        kind: openai
        model: gpt-4o-mini
        base_url: https://api.openai.com/v1   # optional
        api_key_env: OPENAI_API_KEY           # the NAME of an env var; never the key itself
        timeout_s: 30
        max_output_tokens: 1024
        temperature: 0.0
        price: {input_per_mtok: 0.15, output_per_mtok: 0.60}   # optional override

Without ``api_key_env`` no key is sent (local servers such as Ollama need none; the SDK
insists on one, so a placeholder goes in the ``Authorization`` header — never
``OPENAI_API_KEY``, which would hand an OpenAI key to another server).

JSON tasks use structured outputs, ``response_format={"type": "json_schema", ...}``
(https://platform.openai.com/docs/guides/structured-outputs), or ``json_object`` mode
when the task has no schema; ``structured_output: false`` puts the schema into the
instructions instead, for servers without either mode.

Errors (bodies ``{"error": {"message", "type", "param", "code"}}``,
https://platform.openai.com/docs/guides/error-codes): 429 with code ``insufficient_quota``
is :class:`QuotaExceeded`, other 429s :class:`RateLimited` with the ``retry-after-ms`` /
``retry-after`` header; 400 with code ``context_length_exceeded`` (or a context-length
message, as vLLM and llama.cpp send) :class:`ContextLengthExceeded`; the rest as in
:func:`agents.providers.remote.status_error_class`.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

import openai
from pydantic import BaseModel, Field

from agents.providers.base import ProviderError, ProviderRequest, ProviderResponse
from agents.providers.prompting import ANSWER_NAME, answer_schema, build_prompt, unwrap
from agents.providers.remote import (
    CONTEXT_LENGTH,
    HTTPProvider,
    HTTPProviderConfig,
    read_api_key,
    status_error_class,
)

NO_KEY = "no-key"
"""The placeholder key sent when the entry names no ``api_key_env`` (the SDK requires one;
Ollama's docs use any string the same way)."""


class OpenAIProviderConfig(HTTPProviderConfig):
    """One ``kind: openai`` entry (fields of :class:`HTTPProviderConfig`, plus these).

    ``max_tokens_field``: the request field that caps the answer. ``max_tokens`` is what
    every OpenAI-compatible server understands; OpenAI's reasoning models (o-series,
    gpt-5) accept only ``max_completion_tokens``. ``strict_schema``: OpenAI's strict
    structured outputs, which only accept schemas whose objects list every property in
    ``required`` and set ``additionalProperties: false``.
    """

    kind: Literal["openai"] = "openai"
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    strict_schema: bool = False


class _Message(BaseModel):
    content: str | None = None
    refusal: str | None = None


class _Choice(BaseModel):
    message: _Message


class _Completion(BaseModel):
    """The part of a chat completion we use; other fields may be anything (servers vary)."""

    model: str | None = None
    choices: list[_Choice] = Field(min_length=1)


class OpenAIProvider(HTTPProvider):
    """A provider calling an OpenAI-compatible chat-completions endpoint (module docstring).

    Raises ValueError when built if ``api_key_env`` names an unset variable.
    """

    kind = "openai"
    default_key_env = "OPENAI_API_KEY"
    timeout_error = openai.APITimeoutError
    connection_error = openai.APIConnectionError
    http_error = openai.APIStatusError

    def __init__(self, config: OpenAIProviderConfig) -> None:
        super().__init__(config, read_api_key(config.api_key_env, example=self.default_key_env))

    def new_client(self, key: str | None) -> openai.AsyncOpenAI:
        """An ``AsyncOpenAI`` for ``base_url``, the entry's timeout, no retries."""
        return openai.AsyncOpenAI(
            api_key=key or NO_KEY,
            base_url=self.config.base_url,
            timeout=self.config.timeout_s,
            max_retries=0,  # the executor's retry policy is the only retry loop
        )

    def _params(self, request: ProviderRequest) -> tuple[dict[str, Any], bool]:
        """The ``chat.completions.create`` arguments, and whether the schema was wrapped."""
        structured = self.config.structured_output and request.kind == "json"
        prompt = build_prompt(request, structured=structured)
        params: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": prompt.system},
                {"role": "user", "content": prompt.user},
            ],
            self.config.max_tokens_field: self.max_tokens(request),
        }
        if self.config.temperature is not None:
            params["temperature"] = self.config.temperature
        wrapped = False
        if structured and request.json_schema is not None:
            schema, wrapped = answer_schema(request.json_schema)
            params["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": ANSWER_NAME,
                    "schema": schema,
                    "strict": self.config.strict_schema,
                },
            }
        elif structured:
            params["response_format"] = {"type": "json_object"}
        return params, wrapped

    async def complete(self, request: ProviderRequest) -> ProviderResponse:
        """One chat completion for ``request`` (no retries).

        Raises :class:`RateLimited`, :class:`QuotaExceeded`, :class:`ServerError`,
        :class:`AuthError`, :class:`ContextLengthExceeded`, :class:`BadRequest`,
        :class:`ProviderTimeout`, :class:`ConnectionFailed` or :class:`MalformedResponse`.
        """
        params, wrapped = self._params(request)
        started = time.perf_counter()
        create = self.client().chat.completions.with_raw_response.create
        body, status = await self.send(create, params, started)
        completion, input_tokens, output_tokens = self.validate(
            body,
            _Completion,
            status=status,
            usage_keys=("prompt_tokens", "completion_tokens"),
            started=started,
        )
        message = completion.choices[0].message
        # A refusal (structured outputs) has no content; its text fails validation honestly.
        text = message.content if message.content is not None else message.refusal or ""
        return self.response(
            request,
            text=text,
            structured=_unwrapped(text) if wrapped else None,
            model=completion.model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            started=started,
        )

    def status_error(self, exc: openai.APIStatusError, started: float) -> ProviderError:
        """The ProviderError for an HTTP error response (the SDK puts the body's ``error``
        object in ``exc.body``; ``exc.code`` and ``exc.type`` are its fields)."""
        body = exc.body if isinstance(exc.body, dict) else {}
        message = body.get("message") if isinstance(body.get("message"), str) else None
        code = exc.code or ""
        cls = status_error_class(
            exc.status_code,
            overloaded=False,
            quota=exc.status_code == 429 and code == "insufficient_quota",
            context_length=code == "context_length_exceeded"
            or bool(message and CONTEXT_LENGTH.search(message)),
        )
        return self.http_status_error(
            cls,
            status=exc.status_code,
            kind=code or exc.type,
            message=message,
            headers=exc.response.headers,
            started=started,
        )


def _unwrapped(text: str) -> str | None:
    """The JSON text of a wrapped structured answer's ``value``; None when ``text`` is not
    JSON after all (then :func:`~agents.providers.extract.extract_json` sees the raw text)."""
    try:
        return json.dumps(unwrap(json.loads(text), True))
    except ValueError:
        return None
