"""Datasets, preprocessing and the input pipeline."""
