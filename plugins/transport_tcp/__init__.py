"""TCP transport (arrives with the TCP fallback issue)."""
