"""The exception types several layers raise and catch, in a module that imports nothing of hpo.

``schema``, ``config``, the data package and the model kinds all refuse bad input; the command line
turns these into one paragraph and an exit code. Keeping them here lets each of those modules raise
them without importing another (schema and config no longer import the model kinds' base module for
their error type).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """The composed config (or a sampled trial) holds a value that is not allowed."""
