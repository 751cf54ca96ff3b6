"""X-Pression."""
