"""The registry of model kinds: every other module asks ``kind(name)`` instead of comparing strings.

Adding a kind: a folder ``hpo/models/<name>/`` with ``kind.py`` (a ``ModelKind`` subclass), a model
config ``conf/model/<name>.yaml`` and a search space ``conf/search/<name>.yaml``; then one line below.
Kinds are imported when first asked for: featomic and quippy take seconds to load.
"""

from __future__ import annotations

import importlib

from hpo.errors import ConfigError
from hpo.models.base import ModelKind

# name -> module holding its ModelKind subclass as ``KIND``
KINDS = {"gap": "hpo.models.gap.kind", "sagpr": "hpo.models.sagpr.kind"}


def kind(name: str) -> ModelKind:
    """The model kind called ``name`` (``model.kind`` of the config)."""
    if name not in KINDS:
        raise ConfigError(f"model.kind={name!r} is not allowed: one of {tuple(KINDS)}")
    return importlib.import_module(KINDS[name]).KIND


def md_kind() -> ModelKind:
    """The kind whose models drive MD (``ModelKind.drives_md``): what ``md`` and the stability gate run."""
    found = [name for name in KINDS if kind(name).drives_md]
    if len(found) != 1:
        raise ConfigError(f"exactly one model kind must drive MD, found {found}")
    return kind(found[0])
