"""The provider registry: build providers from a providers YAML file (SPEC §4 "Providers").

The file's ``providers`` key lists one mapping per provider; ``kind`` picks the entry of
:data:`PROVIDER_KINDS` that validates the rest and builds the provider. Other top-level keys
are ignored, so the same file can also carry other app configuration. Example::

    providers:
      - id: oracle
        kind: sim
        model: grok-4            # priced as this model (genai-prices)
        accuracy: 1.0            # or a mapping task_type -> accuracy with a "default" key
        error_rate: 0.0
        timeout_rate: 0.0
        latency_ms: {mean: 5, p95: 10}

Real endpoints are kinds ``openai`` (any OpenAI-compatible chat-completions server) and
``anthropic`` (the Messages API); see :mod:`agents.providers.openai_kind` and
:mod:`agents.providers.anthropic_kind` for their fields. Their ``api_key_env`` names an
environment variable read when the provider is built: an unset one is a
:class:`ProviderConfigError` naming it.

With no path, the profiles shipped in ``defaults.yaml`` next to this module are loaded. Every
problem is reported as a :class:`ProviderConfigError` naming the file, the entry and the field.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import yaml
from pydantic import BaseModel, ValidationError

from agents.providers.base import Provider
from agents.providers.pricing import resolve_model
from models.codec import describe_validation


class ProviderConfigError(ValueError):
    """A providers file or entry is invalid; the message names file, entry and field."""


@dataclass(frozen=True)
class ProviderKind:
    """How to build one kind: the module defining it, the pydantic model in it that validates
    an entry, and the :class:`Provider` class built from the validated entry.
    ``priced_model_required``: the entry's ``model`` must be one genai-prices knows (the sim
    kind stands for a real model and is priced as it); the HTTP kinds accept any model and
    count an unpriced one as costing 0, with a warning.

    The module is imported on first use: the openai and anthropic SDKs take about a second
    to import, which no command that builds no HTTP provider should pay."""

    module: str
    config_name: str
    provider_name: str
    priced_model_required: bool = True

    @property
    def config_model(self) -> type[BaseModel]:
        return getattr(importlib.import_module(self.module), self.config_name)

    def build(self, config: Any) -> Provider:
        return getattr(importlib.import_module(self.module), self.provider_name)(config)


# ``replay`` is built from recorded events, not from a providers file.
PROVIDER_KINDS: dict[str, ProviderKind] = {
    "sim": ProviderKind("agents.providers.sim", "SimProviderConfig", "SimProvider"),
    "openai": ProviderKind("agents.providers.openai_kind", "OpenAIProviderConfig",
                           "OpenAIProvider", priced_model_required=False),
    "anthropic": ProviderKind("agents.providers.anthropic_kind", "AnthropicProviderConfig",
                              "AnthropicProvider", priced_model_required=False),
}

DEFAULTS_RESOURCE = "defaults.yaml"


def load_providers(
    path: str | Path | None = None, *, seed: int | None = None
) -> dict[str, Provider]:
    """Build the providers declared in the YAML file at ``path`` (None: the shipped defaults).

    Returns providers by id, in file order. ``seed``, when given, overrides the ``seed`` of
    every provider whose kind has one (the sim kind). Relative paths inside entries (e.g. a
    sim ``reference_file``) are resolved against the file's directory.
    Raises :class:`ProviderConfigError`.
    """
    if path is None:
        resource = resources.files(__package__).joinpath(DEFAULTS_RESOURCE)
        source, base_dir = f"{__package__}/{DEFAULTS_RESOURCE}", None
        text = resource.read_text(encoding="utf-8")
    else:
        source, base_dir = str(path), Path(path).resolve().parent
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ProviderConfigError(f"{source}: cannot read providers file: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProviderConfigError(f"{source}: invalid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("providers"), list):
        raise ProviderConfigError(f"{source}: expected a mapping with a 'providers' list")
    return build_providers(data["providers"], source=source, base_dir=base_dir, seed=seed)


def build_providers(
    entries: list[Any],
    *,
    source: str = "<config>",
    base_dir: Path | None = None,
    seed: int | None = None,
) -> dict[str, Provider]:
    """Build providers from already-parsed entries (e.g. a ``providers`` section of an app
    config). ``source`` names the origin in error messages; see :func:`load_providers` for
    ``base_dir`` and ``seed``. Raises :class:`ProviderConfigError`.
    """
    if not entries:
        raise ProviderConfigError(f"{source}: 'providers' declares no providers")
    providers: dict[str, Provider] = {}
    first_index: dict[str, int] = {}
    for index, entry in enumerate(entries):
        where = f"{source}: providers[{index}]"
        if not isinstance(entry, dict):
            raise ProviderConfigError(f"{where}: expected a mapping, got {type(entry).__name__}")
        if isinstance(entry.get("id"), str):
            where += f" (id {entry['id']!r})"
        provider = _build_one(entry, where, base_dir, seed)
        if provider.id in first_index:
            raise ProviderConfigError(
                f"{where}: duplicate id {provider.id!r} (first declared in "
                f"providers[{first_index[provider.id]}])"
            )
        first_index[provider.id] = index
        providers[provider.id] = provider
    return providers


def _build_one(
    entry: dict[str, Any], where: str, base_dir: Path | None, seed: int | None
) -> Provider:
    known = ", ".join(sorted(PROVIDER_KINDS))
    kind_name = entry.get("kind")
    if kind_name is None:
        raise ProviderConfigError(f"{where}: field 'kind' is missing (known kinds: {known})")
    kind = PROVIDER_KINDS.get(kind_name)
    if kind is None:
        raise ProviderConfigError(
            f"{where}: field 'kind': unknown kind {kind_name!r} (known kinds: {known})"
        )
    if seed is not None and "seed" in kind.config_model.model_fields:
        entry = {**entry, "seed": seed}
    try:
        config = kind.config_model.model_validate(entry)
    except ValidationError as exc:
        raise ProviderConfigError(f"{where}: {describe_validation(exc, limit=10)}") from None
    model = getattr(config, "model", None)
    if kind.priced_model_required and isinstance(model, str):
        try:
            resolve_model(model)
        except ValueError as exc:
            raise ProviderConfigError(f"{where}: field 'model': {exc}") from None
    config = _resolve_paths(config, base_dir)
    try:
        return kind.build(config)
    except (OSError, ValueError) as exc:
        raise ProviderConfigError(f"{where}: {exc}") from None


def _resolve_paths(config: BaseModel, base_dir: Path | None) -> BaseModel:
    """Make relative Path fields relative to the providers file's directory, not the cwd."""
    if base_dir is None:
        return config
    updates = {
        name: base_dir / value
        for name in type(config).model_fields
        if isinstance(value := getattr(config, name), Path) and not value.is_absolute()
    }
    return config.model_copy(update=updates) if updates else config


def fingerprint(providers: dict[str, Provider]) -> str:
    """16 hex chars of sha256 over every provider's kind, id, model and full configuration,
    in order: equal exactly when two registries would behave alike (seed included)."""
    described = [
        [p.kind, p.id, p.model, config.model_dump(mode="json") if isinstance(config, BaseModel) else None]
        for p in providers.values()
        for config in (getattr(p, "config", None),)
    ]
    return hashlib.sha256(orjson.dumps(described, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
