"""The benchmarks: step times (``jacmatch bench``), data loading, the Jacobian estimators
(``jacmatch estimators``), and BENCHMARKS.md."""
