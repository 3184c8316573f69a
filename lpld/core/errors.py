"""The configuration error of the algorithm layer (re-exported by :mod:`lpld.errors`).

It lives in ``lpld.core`` so that core code (the registries of label codecs, losses, pruning metrics and
recover methods) can refuse an unknown name with the same exception the stages raise, without importing
anything above ``core``.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Invalid configuration value; the message names the valid choices."""
