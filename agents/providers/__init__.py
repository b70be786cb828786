"""LLM providers behind one interface (SPEC §4 "Providers").

:class:`Provider` answers a :class:`ProviderRequest` with a :class:`ProviderResponse` or raises
a :class:`ProviderError` subclass. :func:`load_providers` builds them from a providers YAML
file (or the shipped ``defaults.yaml``). Kinds: ``sim`` (simulated models for demos, chaos
tests and policy studies); ``openai``, ``anthropic`` and ``replay`` plug into the same
registry table. :func:`price_usd` prices calls with genai-prices.
"""

from agents.providers.base import (
    Provider,
    ProviderError,
    ProviderRequest,
    ProviderResponse,
    ProviderTimeout,
    RateLimited,
    ServerError,
)
from agents.providers.pricing import price_usd
from agents.providers.registry import (
    PROVIDER_KINDS,
    ProviderConfigError,
    build_providers,
    load_providers,
)
from agents.providers.sim import SimProvider, SimProviderConfig

__all__ = [
    "PROVIDER_KINDS",
    "Provider",
    "ProviderConfigError",
    "ProviderError",
    "ProviderRequest",
    "ProviderResponse",
    "ProviderTimeout",
    "RateLimited",
    "ServerError",
    "SimProvider",
    "SimProviderConfig",
    "build_providers",
    "load_providers",
    "price_usd",
]
