"""Helpers of the test suite only (imported as `helpers.*`: pytest puts tests/ on sys.path through
tests/conftest.py). What the benchmarks share with the tests lives in devtools/ at the repository root."""
