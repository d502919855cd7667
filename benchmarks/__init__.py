"""Side-by-side benchmarks: fedcoord against a reference implementation in the same process.

Each module runs as ``python -m benchmarks.<name>``, prints a table, writes
``benchmarks/results/<name>.json`` and rewrites its own section of
``benchmarks/RESULTS.md``. They measure; tests only check that they run and agree.
"""
