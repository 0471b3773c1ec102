"""The maths of docs/method.md: Jacobians, losses, the composed objective, the propositions.

Knows nothing of data sets, training loops, files or processes.
"""
