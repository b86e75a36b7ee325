"""What the tests share: float64 references, problem builders, tolerances, the distributed harness, the bf16
interpreter fixture, the AOT compile. Importable from every test folder (``pythonpath`` in pyproject.toml); no test
module imports another (tests/test_import_graph.py)."""
