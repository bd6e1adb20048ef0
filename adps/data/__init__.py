"""Datasets: layouts and importers, the embedded synthetic dataset, anomaly synthesis, torch Datasets."""
