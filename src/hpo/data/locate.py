"""Where a data set's files are: the paths a user gave, or named files found by a checked locator.

A dataset config is one of three presets (``layout_of``):

- ``dataset=files``: a training, a validation and optionally a test file, paths as given;
- ``dataset=pool``: a list of files that hpo splits itself;
- the workshop layout (``dataset=water``): named files (training files of fixed sizes, a validation file,
  a test file) found by the sha256 locator below in ``dataset.data_dir`` (``$HPO_DATA_DIR``), each of
  ``dataset.fallback_dirs`` relative to the working directory, and finally a user cache filled by a
  download that must match ``dataset.sha256``.

Paths a user types are relative to the working directory (``hpo.paths.resolve_path``).
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from typing import ClassVar

from hpo.data.read import Keys, explicit_keys, sha256sum
from hpo.errors import DataError
from hpo.paths import resolve_path


def find_data_dir(dataset_cfg, wanted: list[str]) -> Path:
    """Return the first configured directory that holds every file in ``wanted``.

    Downloads missing files into ``dataset.cache_dir`` when no local directory
    has them; every downloaded file must match its configured sha256.
    """
    if dataset_cfg.data_dir:
        # An explicit directory is the user's choice: never fall back silently from it.
        explicit = resolve_path(dataset_cfg.data_dir)
        if not explicit.is_dir():
            raise DataError(
                f"dataset.data_dir={dataset_cfg.data_dir!r} is not a directory "
                f"(resolved to {explicit}); set it or HPO_DATA_DIR to the folder with {', '.join(wanted)}"
            )
        missing = [name for name in wanted if not (explicit / name).is_file()]
        if missing:
            raise DataError(f"dataset.data_dir {explicit} lacks {', '.join(missing)}")
        return explicit
    for directory in (resolve_path(d) for d in dataset_cfg.fallback_dirs):
        if all((directory / name).is_file() for name in wanted):
            return directory
    return download(dataset_cfg, wanted)


def download(dataset_cfg, wanted: list[str]) -> Path:
    """Fill the cache directory from ``dataset.download_url``, checking sha256."""
    cache = resolve_path(dataset_cfg.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        expected = dataset_cfg.sha256.get(name)
        if expected is None:
            raise DataError(f"{name} is in no local data directory and dataset.sha256 has no checksum to download it with")
        target = cache / name
        if target.is_file() and sha256sum(target) == expected:
            continue
        url = dataset_cfg.download_url.format(file=name)
        print(f"[hpo] downloading {url}", flush=True)
        partial = target.with_suffix(target.suffix + ".part")
        try:
            urllib.request.urlretrieve(url, partial)
        except OSError as exc:
            raise DataError(
                f"no local copy of {name} (looked in HPO_DATA_DIR and {[str(resolve_path(d)) for d in dataset_cfg.fallback_dirs]}) "
                f"and the download from {url} failed: {exc}"
            ) from exc
        actual = sha256sum(partial)
        if actual != expected:
            partial.unlink()
            raise DataError(f"downloaded {name} has sha256 {actual}, expected {expected}; file discarded")
        os.replace(partial, target)
    return cache


def locate(dataset_cfg, name: str) -> Path:
    """The path of one named file of the workshop layout."""
    return find_data_dir(dataset_cfg, [name]) / name


def train_file(dataset_cfg) -> str:
    """The workshop layout's training file of ``dataset.train_size``."""
    files = {int(k): v for k, v in dataset_cfg.train_files.items()}
    return files[int(dataset_cfg.train_size)]


class Layout:
    """How a dataset config names its files; ``layout_of`` picks the preset."""

    # True: training sets are files of fixed sizes (``dataset.train_files``) and ``dataset.train_size``
    # picks one; False: the training set is the user's split, whatever its size.
    fixed_train_files: ClassVar[bool]

    def __init__(self, dataset_cfg):
        self.dataset = dataset_cfg

    def files(self, include_test: bool = True) -> dict[str, Path]:
        """label -> path of every file the data set's splits come from (located, not read)."""
        raise NotImplementedError

    def given_keys(self) -> Keys:
        """The keys the config names (``None``: detected when the files are read)."""
        raise NotImplementedError

    def no_test_reason(self) -> str:
        """Why the data set has no test split, in the words of its config (said by ``promote``)."""
        raise NotImplementedError


class Workshop(Layout):
    """Named files found by the sha256 locator: the training file of ``dataset.train_size``, the
    validation file and the test file (whose frames in the training file are not test frames)."""

    fixed_train_files = True

    def files(self, include_test: bool = True) -> dict[str, Path]:
        names = [train_file(self.dataset), self.dataset.validation_file]
        directory = find_data_dir(self.dataset, names)  # training and validation from one folder
        files = {name: directory / name for name in names}
        test = self.dataset.get("test_file")
        if include_test and test and test not in files:
            files[test] = locate(self.dataset, test)
        return files

    def given_keys(self) -> Keys:
        return Keys.of(self.dataset.property_keys)

    def no_test_reason(self) -> str:
        return f"dataset.test_file={self.dataset.get('test_file')!r} has no frame outside the training set"


class OwnFiles(Layout):
    """``dataset=files`` (train/val[/test], each file a split) or ``dataset=pool`` (files hpo splits)."""

    fixed_train_files = False

    def files(self, include_test: bool = True) -> dict[str, Path]:
        return {label: resolve_path(path) for label, path in own_files(self.dataset, include_test).items()}

    def given_keys(self) -> Keys:
        return Keys(**explicit_keys(self.dataset))

    def no_test_reason(self) -> str:
        if self.dataset.source == "files":
            return "dataset.test is not given"
        return f"dataset.split.test={self.dataset.get('split', {}).get('test')!r} keeps no frame for it"


def layout_of(dataset_cfg) -> Layout:
    """The preset of a dataset config: ``source: files|pool`` (conf/dataset/files.yaml, pool.yaml), else the
    workshop layout (conf/dataset/water.yaml)."""
    return OwnFiles(dataset_cfg) if dataset_cfg.get("source") in ("files", "pool") else Workshop(dataset_cfg)


def own_files(dataset_cfg, include_test: bool = True) -> dict[str, str]:
    """label -> path of an own dataset: train/val[/test] for ``files``, the file names for ``pool``."""
    if dataset_cfg.source == "files":
        files = {"train": dataset_cfg.train, "val": dataset_cfg.val}
        if include_test and dataset_cfg.get("test"):
            files["test"] = dataset_cfg.test
        return files
    files = {}
    for path in dataset_cfg.files:
        label = Path(str(path)).name
        if label in files:  # two files of one name in different directories
            label = f"{Path(str(path)).parent.name}/{label}"
        files[label] = path
    return files
