"""The topic registry: roles and names from topics.yaml, and idempotent topic creation."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

log = logging.getLogger("rmo.topics")

ROLES = (
    "tasks", "analyses", "executions", "decisions", "calls", "validations",
    "errors", "rewards", "learning", "metrics", "system", "deadletter", "jobs",
)
DEFAULT_FILE = Path(__file__).resolve().parent.parent / "topics.yaml"


class TopicsFileError(ValueError):
    """topics.yaml is missing a role or has a malformed entry; the message names the fix."""


@dataclass(frozen=True)
class TopicSpec:
    role: str
    name: str
    partitions: int
    config: dict[str, str]
    events: tuple[str, ...]


@dataclass(frozen=True)
class TopicRegistry:
    """role -> TopicSpec for one namespace."""

    specs: dict[str, TopicSpec]

    def name(self, role: str) -> str:
        return self.specs[role].name

    def role_of(self, topic: str) -> str:
        for spec in self.specs.values():
            if spec.name == topic:
                return spec.role
        raise KeyError(topic)

    def __iter__(self):
        return iter(self.specs.values())


def load_topics(namespace: str, path: Path | None = None) -> TopicRegistry:
    """Read topics.yaml, substituting ``{namespace}`` in names.

    Raises:
        TopicsFileError: a role is missing or an entry lacks name/partitions.
    """
    path = path or DEFAULT_FILE
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise TopicsFileError(f"{path} not found: set RMO_TOPICS_FILE to your topics.yaml") from None
    entries = (doc or {}).get("topics") or {}
    specs: dict[str, TopicSpec] = {}
    for role in ROLES:
        e = entries.get(role)
        if not isinstance(e, dict) or "name" not in e or "partitions" not in e:
            raise TopicsFileError(f"{path}: role {role!r} needs an entry with name and partitions")
        specs[role] = TopicSpec(
            role=role,
            name=str(e["name"]).format(namespace=namespace),
            partitions=int(e["partitions"]),
            config={str(k): str(v) for k, v in (e.get("config") or {}).items()},
            events=tuple(e.get("events") or ()),
        )
    return TopicRegistry(specs)


async def create_topics(bootstrap: str, registry: TopicRegistry, timeout_s: float = 30.0) -> list[str]:
    """Create every topic of the registry that does not exist yet; return the names created.

    Idempotent: existing topics are left alone. Topic configs the broker rejects
    (Tansu accepts none of the retention settings) are retried without config.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    try:
        await admin.start()  # inside: a start that fails still closes its connections
        existing = set(await admin.list_topics())
        missing = [s for s in registry if s.name not in existing]
        created = []
        for spec in missing:
            for config in (spec.config, {}):
                try:
                    await admin.create_topics(
                        [NewTopic(spec.name, spec.partitions, 1, topic_configs=config)]
                    )
                    created.append(spec.name)
                    break
                except TopicAlreadyExistsError:
                    break
                except Exception as exc:  # the broker refused the config; retry bare
                    if not config:
                        raise
                    log.warning("topic %s: config %s rejected (%s); created without it",
                                spec.name, config, exc)
        if created:
            await _await_metadata(admin, created)
        return created
    finally:
        await admin.close()


async def _await_metadata(admin: AIOKafkaAdminClient, names: list[str]) -> None:
    for _ in range(50):
        if set(names) <= set(await admin.list_topics()):
            return
        await asyncio.sleep(0.1)
