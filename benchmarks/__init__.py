"""Benchmarks; each writes a JSON result."""
