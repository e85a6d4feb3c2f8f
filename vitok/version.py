"""The package version: a leaf every layer may read (pyproject.toml takes it from here)."""

__version__ = "0.1.0"
