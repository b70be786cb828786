"""Kind ``replay``: answers from recorded ``ProviderCallCompleted``/``ProviderCallFailed``
events, so a task can be re-executed from history with no new provider call (SPEC §4)."""

from __future__ import annotations

from typing import ClassVar

from agents.providers.base import (
    ERROR_CLASSES,
    Provider,
    ProviderError,
    ProviderRequest,
    ProviderResponse,
)
from models.events import ProviderCallCompleted, ProviderCallFailed


class ReplayMiss(ProviderError):
    """No recorded call for this (task, attempt): history cannot answer it."""

    error_type: ClassVar[str] = "replay_miss"


class ReplayProvider(Provider):
    """Stands in for provider ``id``, answering each (task_id, attempt) as recorded.

    A recorded failure is raised again as the same ProviderError kind; an attempt that was
    never made raises ReplayMiss. ``served`` counts the recorded answers handed out.
    """

    kind = "replay"

    def __init__(self, provider_id: str, model: str,
                 recordings: list[ProviderCallCompleted | ProviderCallFailed]) -> None:
        self.id = provider_id
        self.model = model
        self._calls = {(c.task_id, c.attempt): c for c in recordings if c.provider == provider_id}
        self.served = 0

    async def complete(self, request: ProviderRequest) -> ProviderResponse:
        call = self._calls.get((request.task_id, request.attempt))
        if call is None:
            raise ReplayMiss(f"no recorded call of {self.id} for {request.task_id} "
                             f"attempt {request.attempt}")
        self.served += 1
        if isinstance(call, ProviderCallFailed):
            raise ERROR_CLASSES.get(call.error_type, ProviderError)(
                call.message or call.error_type, http_status=call.http_status,
                retry_after_s=call.retry_after_s, latency_ms=call.latency_ms,
                input_tokens=call.input_tokens, output_tokens=call.output_tokens,
                cost_usd=call.cost_usd)
        return ProviderResponse(text=call.response_text, model=call.model,
                                input_tokens=call.input_tokens, output_tokens=call.output_tokens,
                                cost_usd=call.cost_usd, latency_ms=call.latency_ms)
