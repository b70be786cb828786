"""Stage processors and the logic they run: analyzers, providers, consensus, policy,
breakers, sandbox, validation and learning (SPEC §4)."""
