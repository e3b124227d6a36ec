"""The registry of model kinds: every other module asks ``kind(name)`` instead of comparing strings.

Adding a kind: a folder ``hpo/models/<name>/`` with ``kind.py`` (a ``ModelKind`` subclass), a model
config ``conf/model/<name>.yaml``, a search space ``conf/search/<name>.yaml`` and what its figures show
``conf/figures/<name>.yaml``; then one line below.
Kinds are imported when first asked for: featomic and quippy take seconds to load.
"""

from __future__ import annotations

import importlib

from hpo.errors import ConfigError
from hpo.models.base import ModelKind

# name -> module holding its ModelKind subclass as ``KIND``
KINDS = {"gap": "hpo.models.gap.kind", "sagpr": "hpo.models.sagpr.kind", "ridge": "hpo.models.ridge.kind", "mace": "hpo.models.mace.kind"}


def kind(name: str) -> ModelKind:
    """The model kind called ``name`` (``model.kind`` of the config)."""
    if name not in KINDS:
        raise ConfigError(f"model.kind={name!r} is not allowed: one of {tuple(KINDS)}")
    return importlib.import_module(KINDS[name]).KIND


def md_kind(preferred: str | None = None) -> ModelKind:
    """The kind whose models drive MD (``ModelKind.drives_md``): ``preferred`` (the config's or a registered
    model's kind) when it does, else the first registered kind that does."""
    if preferred in KINDS and kind(preferred).drives_md:
        return kind(preferred)
    found = [name for name in KINDS if kind(name).drives_md]
    if not found:
        raise ConfigError("no model kind drives MD")
    return kind(found[0])


def kind_for_target(target: str) -> ModelKind:
    """The first registered kind that learns ``target`` (e.g. the polarizability, for ``polarize``)."""
    for name in KINDS:
        if target in kind(name).targets:
            return kind(name)
    raise ConfigError(f"no model kind learns {target!r}")


def kind_holding(path) -> ModelKind | None:
    """The kind whose stored model ``path`` is (``ModelKind.holds``), None if no kind's."""
    for name in KINDS:
        if kind(name).holds(path):
            return kind(name)
    return None
