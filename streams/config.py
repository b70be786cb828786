"""Runtime settings, read from the environment (prefix ``RMO_``) by pydantic-settings.

Service addresses keep their conventional names: ``KAFKA_BOOTSTRAP_SERVERS`` and ``REDIS_URL``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of a worker or CLI run. Defaults are the seeds' numbers (SPEC §7)."""

    model_config = SettingsConfigDict(env_prefix="RMO_", extra="ignore", frozen=True)

    namespace: str = Field(default="rmo", pattern=r"^[A-Za-z0-9_.-]+$")
    kafka_bootstrap_servers: str | None = Field(
        default=None, validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "RMO_KAFKA")
    )
    # None until resolved (streams.locate): unset means rmo up's, the local or an embedded one
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "RMO_REDIS_URL")
    )
    topics_file: Path | None = None
    providers_file: Path | None = None
    # budgets (agents/budget.py): the YAML file of budget lines (none: unlimited), and how
    # long a settled call's amount counts as pending (s) if its event is never projected;
    # it must exceed the calls consumer's lag, 600 s is far above the seconds it runs at
    budgets_file: Path | None = None
    budget_pending_ttl_s: float = Field(default=600.0, gt=0)
    seed: int = 0

    # Kafka consumer tuning. Tansu's first JoinGroup waits session_timeout/2 (SPEC §2).
    session_timeout_s: float = 6.0
    batch_max: int = 1000
    # records per executor batch (None: batch_max). A batch's provider calls run concurrently,
    # so with slow providers this is the calls in flight per worker (`rmo bench` in flight)
    executor_batch_max: int | None = Field(default=None, ge=1)
    # a consumer whose last batch ended this long ago (s) takes a new record at once; a busy
    # one gathers what arrives until this long after its last batch ended (streams/batching.py)
    batch_within_s: float = Field(default=0.05, ge=0)
    # seen-id buckets (streams/seen.py): a new epoch every seen_rotate_s, and a bucket kept
    # until a close seen_retention_s after its own was passed. The retention must exceed the
    # time a duplicate can take that offsets do not bound (a zombie's batch, checked after
    # streams.stage.STALE_CHECK_S 10 s; a client's send retry, aiokafka's 40 s request timeout)
    seen_rotate_s: float = Field(default=30.0, gt=0)
    seen_retention_s: float = Field(default=300.0, ge=60)
    # a task's status hash (`rmo status ID`) expires this long (s) after its latest event, by
    # event time (streams/projections.py write_tasks); 0 keeps it forever. 7 days: Kafka's
    # default log retention. Counters, provider stats and the learned state are kept
    task_retention_s: float = Field(default=7 * 86400.0, ge=0)
    # a task's join buffer of error and outcome sides (agents/pairing.py) expires this long
    # (s, wall clock) after its last write: a pair whose sides are applied further apart is not
    # counted. 7 days: Kafka's default log retention, which a consumer that far behind exceeds
    learn_join_window_s: float = Field(default=7 * 86400.0, ge=60)
    fetch_max_wait_ms: int = 20

    # executor (SPEC §4)
    provider_timeout_s: float = 30.0
    # actions: {provider}:single per provider with "single", all:{strategy} for the other
    # consensus strategies, and "cascade" (cheapest provider first, escalating while the answer
    # fails the prompt's visible examples: FrugalGPT's LLM cascade)
    strategies: tuple[str, ...] = ("single", "majority", "cascade")
    breaker_failure_threshold: int = 5
    breaker_open_timeout_s: float = 60.0
    breaker_success_threshold: int = 2
    breaker_half_open_max_calls: int = 2
    # breaker rate rules and open times (agents/breaker.py BreakerConfig). resilience4j's
    # defaults: failureRateThreshold 50 %, slidingWindowSize 100, minimumNumberOfCalls 100
    # (20 here, so a rate trip happens at moderate traffic), slowCallRateThreshold 100 %,
    # slowCallDurationThreshold 60 s (20 s here: calls time out at provider_timeout_s 30 s).
    # Backoff multiplies the open time per consecutive trip, capped at breaker_max_open_s;
    # a quota/payment error opens for breaker_quota_open_s. A half-open trial permit expires
    # after breaker_permit_ttl_s (longer than one trial call), so a crashed trial frees it.
    breaker_failure_rate: float = Field(default=0.5, gt=0, le=1)
    breaker_window_size: int = Field(default=100, ge=1)
    # 0: count-based window only; > 0: also only the calls of the last breaker_window_s
    # seconds of event time (resilience4j's TIME_BASED window, whose default size is 100 s)
    breaker_window_s: float = Field(default=0.0, ge=0)
    breaker_minimum_calls: int = Field(default=20, ge=1)
    breaker_slow_call_ms: float = Field(default=20_000.0, gt=0)
    breaker_slow_call_rate: float = Field(default=1.0, gt=0, le=1)
    breaker_backoff_factor: float = Field(default=2.0, ge=1)
    breaker_max_open_s: float = Field(default=600.0, gt=0)
    breaker_quota_open_s: float = Field(default=3600.0, gt=0)
    breaker_permit_ttl_s: float = Field(default=45.0, gt=0)
    # retries (agents.executor): attempts per provider and task, first call included; 3 as
    # the openai and anthropic SDKs (DEFAULT_MAX_RETRIES = 2), whose own retries the
    # executor replaces. Backoff before retry n (1, 2, ...) is retry_backoff_s * 2**(n-1)
    # plus up to retry_backoff_s of jitter, at most retry_backoff_max_s (the SDKs' 0.5 s and
    # 8 s), or the provider's Retry-After when longer; a Retry-After over retry_after_cap_s
    # is not waited for: that provider is given up for the task and the executor falls back.
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff_s: float = Field(default=0.5, ge=0)
    retry_backoff_max_s: float = Field(default=8.0, ge=0)
    retry_after_cap_s: float = Field(default=10.0, ge=0)
    # providers asked after the routing action's gave no answer (0: no fallback)
    max_fallbacks: int = Field(default=2, ge=0)

    # validator
    # untrusted code: bwrap/auto refuse to start without bwrap, subprocess opts into reduced
    # isolation, off runs none (agents.sandbox.resolve_mode)
    sandbox: str = Field(default="bwrap", pattern=r"^(bwrap|subprocess|auto|off)$")
    validator_levels: tuple[str, ...] = ("syntax", "static", "security", "tests", "performance")
    validator_concurrency: int = 4

    # routing policy (agents/policy): thompson, epsilon-greedy, random, round-robin or
    # provider:ID; the routing state is the analyzer's features, or the seed's (previous
    # provider, task_type, complexity) with policy_state "seed"; no admissible action's
    # logged propensity falls below propensity_floor (offline evaluation stays bounded)
    policy: str = "thompson"
    policy_state: str = Field(default="features", pattern=r"^(features|seed)$")
    propensity_floor: float = Field(default=0.02, ge=0, le=0.5)
    thompson_samples: int = Field(default=256, ge=1)
    thompson_prior_strength: float = Field(default=2.0, ge=0)
    # learning policies decide at most max(feedback_window, tasks completed) tasks ahead of the
    # completed ones, waiting up to feedback_wait_s for feedback (agents/executor.py admit):
    # a burst is then learned from as it is decided, whatever RMO_BATCH_MAX is; 0 turns it off
    feedback_window: int = Field(default=16, ge=0)
    feedback_wait_s: float = Field(default=2.0, ge=0)

    # learning (Grokputer diagram 4: epsilon 0.970, replay of the latest 1000)
    epsilon_start: float = 0.97
    epsilon_min: float = 0.05
    epsilon_decay: float = 0.99
    learning_rate: float = 0.1
    discount: float = 0.1
    # reward = performance - cost_usd * cost_weight (the seed's reward). 30 per USD, chosen by
    # `rmo study` (README "Routing"): at the seed-era 10 a HumanEval answer's cost (0.0006-0.005
    # USD) was a few percent of a pass and routing spent 60 % more for no more passes
    cost_weight: float = 30.0
    experience_size: int = 1000
    replay_minibatch: int = 4

    metrics_interval_s: float = 5.0
    # Prometheus exposition (streams/prometheus.py): the first port a worker tries (it binds
    # the first free one of streams.prometheus.PORT_SPAN, so workers on one host do not
    # collide), 0 for any free port, -1 for none. Prometheus' list of default exporter ports
    # has filled 9100-9999, so 9700 is no registered port, only a fixed one: fixed ports keep
    # scrape targets (and their `instance` label) stable across restarts. The address is all
    # interfaces, as a Prometheus in another container must reach the worker.
    metrics_port: int = Field(default=9700, ge=-1, le=65535)
    metrics_addr: str = "0.0.0.0"

    def require_kafka(self) -> str:
        """The bootstrap servers, or a ValueError naming the fix when none are resolved."""
        if not self.kafka_bootstrap_servers:
            raise ValueError("no Kafka broker: set KAFKA_BOOTSTRAP_SERVERS or run `rmo up`")
        return self.kafka_bootstrap_servers

    def require_redis(self) -> str:
        """The Redis URL, or a ValueError naming the fix when none is resolved."""
        if not self.redis_url:
            raise ValueError("no Redis: set REDIS_URL or run `rmo up`")
        return self.redis_url
