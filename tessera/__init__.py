"""Tessera: pretraining of decoder-only language models across GPU nodes."""

__version__ = "0.1.0"
