# Fractal-RMO worker image: the `rmo` console script plus bubblewrap for the code sandbox.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# bwrap runs generated code with no network, a read-only root and rlimits (SPEC §2).
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Explicit paths keep the local .venv and caches out of the image.
COPY pyproject.toml README.md topics.yaml ./
COPY streams ./streams
COPY agents ./agents
COPY models ./models
RUN pip install .

# Unprivileged user: bwrap then sandboxes through an unprivileged user namespace, so the
# container needs no added capabilities (see security_opt in docker-compose.yml).
RUN useradd --create-home --uid 10001 rmo
USER rmo

CMD ["rmo", "worker"]
