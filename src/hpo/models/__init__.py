"""The registry of model kinds: every other module asks ``kind(name)`` instead of comparing strings.

Adding a kind: a folder ``hpo/models/<name>/`` with ``kind.py`` (a ``ModelKind`` subclass), a model
config ``conf/model/<name>.yaml`` and a search space ``conf/search/<name>.yaml``; then one line below.
Kinds are imported when first asked for: featomic and quippy take seconds to load.
"""

from __future__ import annotations

import importlib

from hpo.models.base import ConfigError, ModelKind

# name -> module holding its ModelKind subclass as ``KIND``
KINDS = {"gap": "hpo.models.gap.kind", "sagpr": "hpo.models.sagpr.kind"}


def kind(name: str) -> ModelKind:
    """The model kind called ``name`` (``model.kind`` of the config)."""
    if name not in KINDS:
        raise ConfigError(f"model.kind={name!r} is not allowed: one of {tuple(KINDS)}")
    return importlib.import_module(KINDS[name]).KIND
