"""Where hpo's config lives and what a relative path means.

The config ships inside the package (``hpo/conf``), so an installed hpo runs from any folder; Hydra's
``--config-dir`` puts a user's own folder in front of it. Every output goes under the config's ``root``
(the working directory unless ``HPO_ROOT`` or ``root=PATH`` says otherwise, conf/config.yaml), and a
relative path typed by the user means what it means in a shell: relative to the working directory.
An editable install's checkout is recognised (from pip's record, not from where this file lies) only to record
its git commit (provenance of the code that ran); nothing is read or written relative to where the package lives.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parent / "conf"


def _source_checkout() -> Path | None:
    """The checkout an editable install runs from, as pip recorded it (PEP 610 ``direct_url.json``), else None: the
    code's location is not guessed from this file's path, and an installed copy has no git commit to record."""
    import json
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    try:
        recorded = json.loads(metadata.distribution("hpo").read_text("direct_url.json") or "{}")
    except (metadata.PackageNotFoundError, ValueError):
        return None
    url = urlparse(recorded.get("url", ""))
    if not recorded.get("dir_info", {}).get("editable") or url.scheme != "file":
        return None
    return Path(unquote(url.path))


SOURCE_CHECKOUT = _source_checkout()


def resolve_path(path: str | os.PathLike) -> Path:
    """A path as a user means it: ``~`` expanded, a relative path against the working directory."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else Path.cwd() / path


def absolute(path: str | os.PathLike) -> str:
    """``resolve_path`` made absolute and normalised, as a string for config interpolations
    (``${hpo.abspath:${root}}``): a URL built on it (``sqlite:///...``) is absolute, so it means the same
    folder in every process whatever its working directory."""
    return str(resolve_path(path).resolve())


# The conf files' own interpolations, registered here because every reader of the config (each command, worker
# process and submitit job) imports this module before composing:
# ${hpo.or:VALUE,DEFAULT}: DEFAULT when VALUE is null (e.g. the study name of dataset.train_size=null);
# ${hpo.abspath:${root}}: the output root as an absolute path (~ expanded, relative to the working directory),
# so root=~/runs, root=runs and HPO_ROOT=... all give URLs and directories that every process reads alike.
OmegaConf.register_new_resolver("hpo.or", lambda value, default: default if value is None else value, replace=True)
OmegaConf.register_new_resolver("hpo.abspath", lambda path: absolute(str(path)), replace=True)
