"""Errors of the semantic cache; each message names what was wrong."""

from __future__ import annotations


class CacheError(Exception):
    """Base class: the semantic cache could not do what was asked."""


class QueryError(CacheError, ValueError):
    """A query (or conversation context) the cache refuses: empty, too long, or not UTF-8."""


class KeyError_(CacheError, ValueError):
    """A namespace or fingerprint that is not valid."""


class EmbedderError(CacheError):
    """The embedding model could not be loaded or failed on an input."""


class ConfigError(CacheError, ValueError):
    """A cache configuration value, or the shipped calibration data, is not valid."""
