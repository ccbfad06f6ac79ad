"""fettle-jax: FETTLE (SIGIR'24) multi-modal alignment and recommender backbones in JAX."""

__version__ = "0.1.0"
