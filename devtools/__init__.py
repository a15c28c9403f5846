"""Development tools shared by the tests and the benchmarks; not part of the shipped package
(setup.py leaves this folder out of the wheel). Importable from the repository root."""
