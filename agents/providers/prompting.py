"""What the HTTP kinds (``openai``, ``anthropic``) send for each task kind (SPEC §4).

- ``code``: the prompt (a module prefix: signature and docstring, as in HumanEval) inside a
  fenced block, asking for one complete function in one fenced Python block. The answer is
  turned into a module by :func:`agents.providers.extract.extract_code`.
- ``json``: the prompt; the JSON Schema goes to the endpoint's structured-output mode when
  the entry enables it (see :func:`answer_schema`), else into the instructions.
- ``text``: the prompt, asking for a direct answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agents.providers.base import ProviderRequest

ANSWER_NAME = "answer"
"""Name of the structured answer: OpenAI's ``json_schema.name`` and Anthropic's tool name
(both must match ``^[a-zA-Z0-9_-]{1,64}$``)."""

WRAPPED_KEY = "value"
"""Property that carries a non-object answer when the schema has to be wrapped."""

CODE_SYSTEM = (
    "You are an expert Python programmer. Complete the Python function the user gives you. "
    "Reply with the complete function, its signature included, in one ```python fenced code "
    "block, together with any imports it needs. Do not add tests, example usage or "
    "explanations."
)
JSON_SYSTEM = "Reply with a JSON value that satisfies the task's JSON Schema."
JSON_PLAIN_SYSTEM = (
    "Reply with only a JSON value: no prose and no code fence."
    " It must satisfy this JSON Schema:\n{schema}"
)
JSON_PLAIN_NO_SCHEMA = "Reply with only a JSON value: no prose and no code fence."
TEXT_SYSTEM = "Answer the user's request directly and concisely."


@dataclass(frozen=True)
class Prompt:
    """The system instructions and the user message of one chat request."""

    system: str
    user: str


def build_prompt(request: ProviderRequest, *, structured: bool) -> Prompt:
    """The chat messages for ``request``. ``structured`` is True when the JSON Schema is sent
    through the endpoint's structured-output mode (it is then left out of the text)."""
    if request.kind == "code":
        name = f"`{request.entry_point}`" if request.entry_point else "the function"
        user = f"Complete {name}:\n\n```python\n{request.prompt.rstrip()}\n```"
        return Prompt(CODE_SYSTEM, user)
    if request.kind == "json":
        if structured and request.json_schema is not None:
            return Prompt(JSON_SYSTEM, request.prompt)
        if request.json_schema is None:
            return Prompt(JSON_PLAIN_NO_SCHEMA, request.prompt)
        schema = json.dumps(request.json_schema, indent=2, sort_keys=True)
        return Prompt(JSON_PLAIN_SYSTEM.format(schema=schema), request.prompt)
    return Prompt(TEXT_SYSTEM, request.prompt)


def answer_schema(schema: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """``(schema to send, wrapped)``. Both structured-output modes take an object at the
    root (OpenAI's structured outputs, Anthropic's tool ``input_schema``), so any other
    schema is wrapped as ``{"type": "object", "properties": {"value": schema}}`` and
    ``wrapped`` is True: the answer is then the ``value`` property (:func:`unwrap`)."""
    if schema.get("type") == "object":
        return schema, False
    wrapped = {
        "type": "object",
        "properties": {WRAPPED_KEY: schema},
        "required": [WRAPPED_KEY],
        "additionalProperties": False,
    }
    return wrapped, True


def unwrap(value: Any, wrapped: bool) -> Any:
    """The task's answer from a structured answer built with :func:`answer_schema`."""
    if wrapped and isinstance(value, dict) and WRAPPED_KEY in value:
        return value[WRAPPED_KEY]
    return value
