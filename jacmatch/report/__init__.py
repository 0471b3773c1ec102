"""The report (``jacmatch report``): results/REPORT.md, the claims' verdicts, the README's
recipe table and the manual's findings."""
