"""Evaluation harness: datasets, protocol and metrics over many images."""
