"""core layer of the server (see docs/architecture.md)."""
