"""Benchmarks that print JSON (`stream-rl bench ...`)."""
