"""Datasets: procedural synthetic scenes (bundled-model training and benchmark)."""
