"""nanojax: nanochat in JAX. See README.md."""

__version__ = "0.1.0"
