"""Faust app, topic registry (from topics.yaml), stage runner, projections, replay, metrics, CLI."""
