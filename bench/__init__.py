"""Benchmark suites (pytest-benchmark) and the report generator (`python -m bench.report`)."""
