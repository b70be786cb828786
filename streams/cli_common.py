"""What every `rmo` command module shares: one-line errors, and resolving the services."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from streams import locate
from streams.config import Settings


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print an error naming the fix and return the Exit to raise."""
    typer.secho(f"error: {message}", err=True, fg="red")
    return typer.Exit(code)


@contextmanager
def services(settings: Settings | None = None) -> Iterator[Settings]:
    """Settings with Kafka and Redis resolved (:func:`streams.locate.locate`); embedded
    services started for this command stop on exit.

    Raises:
        streams.locate.ServiceUnreachable: a set address or a record does not answer.
    """
    settings = settings or Settings()
    found = locate.locate(settings.kafka_bootstrap_servers, settings.redis_url)
    try:
        yield settings.model_copy(update={"kafka_bootstrap_servers": found.bootstrap,
                                          "redis_url": found.redis_url})
    finally:
        for h in found.temporary:
            h.stop()
