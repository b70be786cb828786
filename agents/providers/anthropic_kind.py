"""Kind ``anthropic``: Claude through the Messages API (SPEC §4 "Providers").

Calls go through the official ``anthropic`` SDK (``AsyncAnthropic``, ``POST
{base_url}/v1/messages``, https://docs.anthropic.com/en/api/messages)::

    providers:
      - id: claude
        kind: anthropic
        model: claude-3-5-haiku-latest
        api_key_env: ANTHROPIC_API_KEY        # required: the NAME of an env var
        timeout_s: 30
        max_output_tokens: 1024               # Messages API requires max_tokens on every call

``temperature`` is sent only when the entry sets it (see :meth:`AnthropicProvider._params`).

JSON tasks with a schema use a forced tool call: one tool named ``answer`` whose
``input_schema`` is the task's schema and ``tool_choice={"type": "tool", "name":
"answer"}`` (https://docs.anthropic.com/en/docs/build-with-claude/tool-use); the tool
call's input is the answer. ``structured_output: false`` puts the schema into the
instructions instead.

Errors (bodies ``{"type": "error", "error": {"type", "message"}}``,
https://docs.anthropic.com/en/api/errors): 529 ``overloaded_error`` is :class:`Overloaded`,
429 ``rate_limit_error`` :class:`RateLimited` with the ``retry-after`` header, 402
``billing_error`` :class:`QuotaExceeded`, 400 ``invalid_request_error`` "prompt is too
long" :class:`ContextLengthExceeded`; the rest as in
:func:`agents.providers.remote.status_error_class`.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

import anthropic
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

ANSWER_TOOL_DESCRIPTION = "Give your answer to the user's request as this tool's input."


class AnthropicProviderConfig(HTTPProviderConfig):
    """One ``kind: anthropic`` entry (the fields of :class:`HTTPProviderConfig`);
    ``api_key_env`` is required."""

    kind: Literal["anthropic"] = "anthropic"


class _Block(BaseModel):
    type: str
    text: str | None = None
    name: str | None = None
    input: Any = None


class _Usage(BaseModel):
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)


class _Message(BaseModel):
    """The part of a Messages API response we use."""

    type: Literal["message"]
    model: str | None = None
    content: list[_Block]
    usage: _Usage


class AnthropicProvider(HTTPProvider):
    """A provider calling Anthropic's Messages API (module docstring).

    Raises ValueError when built if ``api_key_env`` is missing or names an unset variable.
    """

    kind = "anthropic"
    default_key_env = "ANTHROPIC_API_KEY"
    timeout_error = anthropic.APITimeoutError
    connection_error = anthropic.APIConnectionError
    http_error = anthropic.APIStatusError

    def __init__(self, config: AnthropicProviderConfig) -> None:
        if config.api_key_env is None:
            raise ValueError(
                "field 'api_key_env': required: the name of the environment variable that "
                f"holds the API key (e.g. {self.default_key_env})"
            )
        super().__init__(config, read_api_key(config.api_key_env, example=self.default_key_env))

    def new_client(self, key: str | None) -> anthropic.AsyncAnthropic:
        """An ``AsyncAnthropic`` for ``base_url``, the entry's timeout, no retries."""
        return anthropic.AsyncAnthropic(
            api_key=key,
            base_url=self.config.base_url,
            timeout=self.config.timeout_s,
            max_retries=0,  # the executor's retry policy is the only retry loop
        )

    def _params(self, request: ProviderRequest) -> tuple[dict[str, Any], bool | None]:
        """The ``messages.create`` arguments, and None when no tool is forced, else
        whether the schema was wrapped."""
        structured = (
            self.config.structured_output and request.kind == "json" and request.json_schema is not None
        )
        prompt = build_prompt(request, structured=structured)
        params: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens(request),
            "system": prompt.system,
            "messages": [{"role": "user", "content": prompt.user}],
        }
        if self.config.temperature is not None:
            # The anthropic SDK 2.x's ``messages.create`` has no ``temperature`` argument;
            # ``extra_body`` is its documented way to send a field it lacks. A model that
            # rejects the field answers 400, a BadRequest.
            params["extra_body"] = {"temperature": self.config.temperature}
        if not structured:
            return params, None
        schema, wrapped = answer_schema(request.json_schema)
        params["tools"] = [
            {"name": ANSWER_NAME, "description": ANSWER_TOOL_DESCRIPTION, "input_schema": schema}
        ]
        params["tool_choice"] = {"type": "tool", "name": ANSWER_NAME}
        return params, wrapped

    async def complete(self, request: ProviderRequest) -> ProviderResponse:
        """One Messages API call for ``request`` (no retries).

        Raises :class:`RateLimited`, :class:`Overloaded`, :class:`ServerError`,
        :class:`QuotaExceeded`, :class:`AuthError`, :class:`ContextLengthExceeded`,
        :class:`BadRequest`, :class:`ProviderTimeout`, :class:`ConnectionFailed` or
        :class:`MalformedResponse`.
        """
        params, wrapped = self._params(request)
        started = time.perf_counter()
        create = self.client().messages.with_raw_response.create
        body, status = await self.send(create, params, started)
        message, input_tokens, output_tokens = self.validate(
            body,
            _Message,
            status=status,
            usage_keys=("input_tokens", "output_tokens"),
            started=started,
        )
        text = "".join(b.text or "" for b in message.content if b.type == "text")
        structured = None
        if wrapped is not None:
            tool_input = next(
                (b.input for b in message.content if b.type == "tool_use" and b.name == ANSWER_NAME),
                None,
            )
            if tool_input is not None:
                structured = json.dumps(unwrap(tool_input, wrapped))
        return self.response(
            request,
            text=text,
            structured=structured,
            model=message.model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            started=started,
        )

    def status_error(self, exc: anthropic.APIStatusError, started: float) -> ProviderError:
        """The ProviderError for an HTTP error response (``exc.type`` and
        ``exc.api_message`` are the body's ``error.type`` and ``error.message``)."""
        kind = exc.type if isinstance(exc.type, str) else None
        message = exc.api_message if isinstance(exc.api_message, str) else None
        cls = status_error_class(
            exc.status_code,
            overloaded=kind == "overloaded_error",
            quota=kind == "billing_error",
            context_length=exc.status_code == 400
            and bool(message and CONTEXT_LENGTH.search(message)),
        )
        return self.http_status_error(
            cls,
            status=exc.status_code,
            kind=kind,
            message=message,
            headers=exc.response.headers,
            started=started,
        )
