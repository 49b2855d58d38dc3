"""The benchmarks behind ``robust-study bench`` (their numbers: docs/benchmarks.md).

Nothing in the product imports this package; only the command line does, when asked to run one.
"""
