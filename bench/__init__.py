"""Benchmarks: plproxy against a direct connection, a bare aiohttp relay and peers (docs/benchmarks.md)."""
