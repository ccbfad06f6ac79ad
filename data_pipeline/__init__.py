"""Data loading, conversion, preparation and feature extraction for fettle-jax."""
