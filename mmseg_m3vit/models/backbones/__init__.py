"""Registered on import; see docs/design.md."""
