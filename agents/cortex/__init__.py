"""Cortex jobs (the Cortex seed): a coordinator that plans a job, domain masters with
budgets, fan-out of subtasks into the task pipeline and fan-in of their verdicts,
escalations to a person. Masters are state and events, not processes (agents/cortex/job.py)."""
