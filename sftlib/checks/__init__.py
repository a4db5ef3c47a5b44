"""Checks around training: pre-flight before it (preflight.py, its report in report.py) and the held-out
figures after it (evaluate.py)."""
