"""Atomistic data, one pipeline for every preset: locate the files, read them, split, check, report.

- ``locate``: where the files are (paths as given, or the workshop's named files found by a sha256
  locator: ``$HPO_DATA_DIR``, fallback folders, a checked download) and the preset of a dataset config;
- ``read``: the one reader (files, keys, units, isolated-atom e0) and ``Keys``, ``FrameSet``;
- ``split``: pool splits, disjoint splits, species coverage, subsets written for gap_fit;
- ``datasets``: ``Datasets`` and the loaders the commands call (fit, test split, a model's own frames);
- ``checks``: the data checks, pure functions of frames; ``report``: their table and plot;
- ``check_command``: ``hpo data check`` and ``optimize``'s pre-fit checks (imported when run: it needs
  the config and MLflow).

What other modules use is importable from ``hpo.data`` itself.
"""

from hpo.data.datasets import Datasets, has_polarizability, load_datasets, load_test_set, model_data
from hpo.data.locate import find_data_dir, layout_of
from hpo.data.read import FrameSet, Keys, detect_keys, read_file, read_frames, read_tensors
from hpo.data.split import joined_frames, shared_frames, subset_frames
from hpo.errors import DataError

__all__ = [
    "DataError", "Datasets", "FrameSet", "Keys", "detect_keys", "find_data_dir", "has_polarizability", "joined_frames",
    "layout_of", "load_datasets", "load_test_set", "model_data", "read_file", "read_frames", "read_tensors",
    "shared_frames", "subset_frames",
]
