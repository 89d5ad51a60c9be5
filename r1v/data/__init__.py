"""Corpus schema, synthetic data, prompt building and the Ray Data preprocessing pipeline."""
