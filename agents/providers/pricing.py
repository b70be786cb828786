"""Cost of a call in USD from the ``genai-prices`` package's offline price snapshot.

genai-prices (https://github.com/pydantic/genai-prices) bundles list prices per provider
and model, including tiered prices (e.g. Gemini 2.5 Pro charges more above 200k input
tokens). So the price of a call is computed per call with ``genai_prices.calc_price``;
only the (slower, fuzzy) model-name resolution is cached per model name. Prices come from
the snapshot bundled with the installed package: no network access.

Real endpoints (the ``openai`` and ``anthropic`` kinds) are priced by a :class:`Pricer`: an
entry's ``price:`` override (:class:`PriceOverride`) when it has one, else genai-prices for
the model the response names; a model genai-prices does not know (a local Ollama model)
costs 0 and is reported as unpriced.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache, lru_cache

from genai_prices import Usage, calc_price
from genai_prices.data_snapshot import get_snapshot
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

MTOK = 1_000_000

# Shown in the error for an unknown model so the fix is one edit away.
KNOWN_EXAMPLES = ("grok-4", "claude-opus-4", "claude-sonnet-4", "gemini-2.5-pro", "gpt-4o")


@dataclass(frozen=True)
class PricedModel:
    """A model name resolved in genai-prices: its provider id, model id and display name."""

    provider_id: str
    model_id: str
    name: str


@cache
def resolve_model(model: str) -> PricedModel:
    """Resolve ``model`` (e.g. ``"grok-4"``) to the genai-prices entry that prices it.

    Raises ValueError naming the model when genai-prices does not know it.
    """
    try:
        provider, info = get_snapshot().find_provider_model(model, None, None, None)
    except LookupError as exc:
        raise ValueError(
            f"no price for model {model!r} in genai-prices: set `model` to a model it knows "
            f"(e.g. {', '.join(KNOWN_EXAMPLES)}) or upgrade genai-prices ({exc})"
        ) from None
    return PricedModel(provider_id=provider.id, model_id=info.id, name=info.name or info.id)


@lru_cache(maxsize=65536)
def price_usd(model: str, input_tokens: int, output_tokens: int) -> float:
    """Price in USD of a call to ``model`` with the given input and output token counts.

    Memoized: genai-prices builds its price model on every call, which costs more than an
    instant sim provider's whole answer; the result is a pure function of the arguments.
    Raises ValueError for a model genai-prices does not know (see :func:`resolve_model`).
    """
    priced = resolve_model(model)
    calc = calc_price(
        Usage(input_tokens=input_tokens, output_tokens=output_tokens),
        model_ref=priced.model_id,
        provider_id=priced.provider_id,
    )
    return float(calc.total_price)


@lru_cache(maxsize=1024)
def lookup_model(model: str) -> PricedModel | None:
    """Like :func:`resolve_model`, but None for a model genai-prices does not know (cached
    too, so pricing a response from an unknown model costs one dict lookup per call)."""
    try:
        return resolve_model(model)
    except ValueError:
        return None


def price_per_mtok(model: str) -> tuple[float, float] | None:
    """``(input, output)`` list price of ``model`` in USD per million tokens, from
    genai-prices (the base tier where prices are tiered), or None when it does not know the
    model."""
    if lookup_model(model) is None:
        return None
    return price_usd(model, MTOK, 0), price_usd(model, 0, MTOK)


class PriceOverride(BaseModel):
    """A providers-file ``price:`` entry, for models genai-prices lacks or prices that differ
    from list prices (a discount, a self-hosted model's cost): USD per million tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        """Cost in USD of ``input_tokens`` and ``output_tokens`` (counts) at this price."""
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / MTOK


class Pricer:
    """Prices the calls of one configured endpoint.

    Order: the ``override`` if given; else genai-prices for the model the response names
    (e.g. ``gpt-4o-mini-2024-07-18`` for a request to ``gpt-4o-mini``); else genai-prices for
    the configured ``model``; else 0 USD. An unpriced configured model is logged once, as a
    warning, when the Pricer is built (at provider start-up).
    """

    def __init__(self, provider_id: str, model: str, override: PriceOverride | None) -> None:
        self.provider_id = provider_id
        self.model = model
        self.override = override
        if override is None and lookup_model(model) is None:
            log.warning(
                "provider %r: genai-prices has no price for model %r; its calls are counted "
                "as costing 0 USD (add `price: {input_per_mtok: ..., output_per_mtok: ...}` "
                "to the entry to price them)",
                provider_id,
                model,
            )

    def per_mtok(self) -> tuple[float, float] | None:
        """``(input, output)`` USD per million tokens for the configured model, or None."""
        if self.override is not None:
            return self.override.input_per_mtok, self.override.output_per_mtok
        return price_per_mtok(self.model)

    def cost_usd(self, response_model: str | None, input_tokens: int, output_tokens: int) -> float:
        """Cost in USD of one call that used the given token counts; ``response_model`` is
        the ``model`` field of the response (None when there was no response body)."""
        if self.override is not None:
            return self.override.cost_usd(input_tokens, output_tokens)
        for model in (response_model, self.model):
            if model and lookup_model(model) is not None:
                return price_usd(model, input_tokens, output_tokens)
        return 0.0
