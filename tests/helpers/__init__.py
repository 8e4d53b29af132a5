"""Shared test helpers (tiny models, cases, reference math), imported as ``tests.helpers.<module>``."""
