"""Shared test helpers: the fake engine of the core's unit tests, and the real server started
through tools/launcher.py with the test suite's limits."""
