"""Helpers shared by the test suite (importable because ``tests/`` is on ``pythonpath``)."""
