"""Metrics, thresholds and reports."""
