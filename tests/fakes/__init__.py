"""Test doubles for the network edge: :mod:`tests.fakes.llm_server` speaks the OpenAI and
Anthropic HTTP APIs."""
