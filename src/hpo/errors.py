"""The exception types several layers raise and catch, in a module that imports nothing of hpo.

``schema``, ``config``, the data package and the model kinds all refuse bad input; the command line
turns these two into one paragraph and an exit code. Keeping them here lets each of those modules
raise them without importing another (config no longer imports the model kinds' base module, nor the
data package, for its error type).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """The composed config (or a sampled trial) holds a value that is not allowed."""


class DataError(ValueError):
    """A data file is missing, malformed or lacks what the model needs."""


class DataCheckError(DataError):
    """The data cannot be checked or converted as asked (unknown unit, conflicting isolated atoms...)."""
