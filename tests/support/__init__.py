"""Helpers shared by kvrelay's tests (real redis-server processes, TLS material)."""
