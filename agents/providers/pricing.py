"""Cost of a call in USD from the ``genai-prices`` package's offline price snapshot.

genai-prices (https://github.com/pydantic/genai-prices) bundles list prices per provider
and model, including tiered prices (e.g. Gemini 2.5 Pro charges more above 200k input
tokens). So the price of a call is computed per call with ``genai_prices.calc_price``;
only the (slower, fuzzy) model-name resolution is cached per model name. Prices come from
the snapshot bundled with the installed package: no network access.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache

from genai_prices import Usage, calc_price
from genai_prices.data_snapshot import get_snapshot

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
