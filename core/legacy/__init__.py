"""Legacy wire mode: docker-connector's own unauthenticated UDP format (see docs/legacy.md)."""
