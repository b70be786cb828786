"""pydantic v2 event and domain models: the wire contract (SPEC §3)."""
