"""Links that open the MLflow 3.17 UI on hpo's training runs, with the chosen metric columns.

What decides the view (MLflow 3.17.2, server/js/build/static/js):

* The UI has a global sidebar switch "GenAI | Model training" (``workflowType``:
  ``genai`` or ``machine_learning``). It comes from the URL parameter
  ``?workflowType=...``, else the browser's localStorage key
  ``mlflow.workflowType``, else ``genai`` (main.*.js, module 7975). A fresh browser
  therefore opens every experiment on the GenAI "Overview" (traces) page.
* The experiment tag ``mlflow.experimentKind`` (``custom_model_development`` /
  ``genai_development``) is only read when that switch is disabled; in the OSS
  3.17 build the switch flag is on (module 89511 ``Z0 = () => true``; module 31080
  maps workflowType to the kind), so the tag does not change the view. hpo still
  sets it (:data:`EXPERIMENT_KIND`): it is the documented kind and older 3.x UIs use it.
* So a link must carry ``?workflowType=machine_learning`` (:func:`experiment_url`).

Default columns: the runs table shows Run Name, Created, Dataset, Duration,
Source, Models; metrics and params only after the user picks them, which is kept
in the browser. A *saved view* makes them show for anyone: an experiment tag
``mlflow.sharedViewState.<id>`` whose value is the envelope
``{"name", "createdAt", "updatedAt", "state"}`` with ``state`` a JSON string of
the runs-page state (``selectedColumns`` as ``metrics.`name``` /
``params.`name```, ``orderByKey``, ``orderByAsc``); it is listed under "Views"
and opened by ``#/experiments/<id>/runs?viewStateShareKey=<id>`` (chunk 5439
writes the same format; chunk 3448 module 53787 reads it). Only through that
link or the Views menu: the plain experiment page keeps the browser's own columns.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from urllib.parse import urlencode, urlsplit, urlunsplit

from hpo.tracking import EXPERIMENT_KIND as KIND_VALUE
from hpo.tracking import EXPERIMENT_KIND_TAG, NOTE_TAG

EXPERIMENT_KIND = (EXPERIMENT_KIND_TAG, KIND_VALUE)  # hpo.tracking sets it on every experiment it opens
SAVED_VIEW_PREFIX = "mlflow.sharedViewState."
TRAINING_WORKFLOW = "machine_learning"
MAX_VIEW_CHARS = 20000  # the UI refuses to save a larger view


def column(kind: str, key: str) -> str:
    """A runs-table column id: ``column("metrics", "val_rmse")`` -> ``metrics.`val_rmse```."""
    if kind not in ("metrics", "params", "tags", "attributes"):
        raise ValueError(f"column kind {kind!r} is not one of metrics, params, tags, attributes")
    return f"{kind}.`{key}`"


def saved_view_tag(
    view_id: str,
    name: str,
    metrics: Sequence[str],
    params: Sequence[str] = (),
    order_by: str | None = None,
    ascending: bool = True,
    now_ms: int | None = None,
    search_filter: str = "",
) -> tuple[str, str]:
    """The experiment tag (key, value) of a saved runs view showing ``metrics`` and ``params``,
    sorted by metric ``order_by`` (default: the first metric), runs filtered by ``search_filter``
    (MLflow's search syntax, e.g. ``tags.run_type = 'trial'``)."""
    if not view_id or any(c in view_id for c in "/?#&="):
        raise ValueError(f"view id {view_id!r} must be non-empty and URL-safe")
    state = {"selectedColumns": [column("metrics", m) for m in metrics] + [column("params", p) for p in params]}
    if search_filter:
        state["searchFilter"] = search_filter
    order = order_by or (metrics[0] if metrics else None)
    if order:
        state.update(orderByKey=column("metrics", order), orderByAsc=bool(ascending))
    now = int(time.time() * 1000) if now_ms is None else int(now_ms)
    value = json.dumps({"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)})
    if len(value) > MAX_VIEW_CHARS:
        raise ValueError(f"saved view {name!r} is {len(value)} characters; the UI takes at most {MAX_VIEW_CHARS}")
    return SAVED_VIEW_PREFIX + view_id, value


def save_runs_view(client, experiment_id: str, view_id: str, name: str, metrics: Sequence[str], **kwargs) -> str:
    """Write the saved view (and the training kind tag) on the experiment; return ``view_id``."""
    key, value = saved_view_tag(view_id, name, metrics, **kwargs)
    client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
    client.set_experiment_tag(experiment_id, key, value)
    return view_id


def experiment_url(ui_url: str, experiment_id: str, view_id: str | None = None) -> str:
    """The UI link of an experiment's runs table in the "Model training" view (with the saved
    view ``view_id`` if given). Any ``user:password@`` of ``ui_url`` is dropped: links get printed."""
    parts = urlsplit(ui_url.rstrip("/"))
    host = parts.netloc.rsplit("@", 1)[-1]
    base = urlunsplit((parts.scheme, host, parts.path, "", ""))
    query = {"workflowType": TRAINING_WORKFLOW}
    if view_id:
        query = {"viewStateShareKey": view_id, **query}
    return f"{base}/#/experiments/{experiment_id}/runs?{urlencode(query)}"


# The saved view of every study's experiment, and the address ``mlflow ui`` serves by default.
TRIALS_VIEW = "hpo-trials"
TRIAL_FILTER = "tags.run_type = 'trial'"
DEFAULT_UI = "http://127.0.0.1:5000"
EXPERIMENT_NOTE = (
    "hpo studies: one parent run per optimize invocation (run_type=study) with one nested run per trial "
    "(run_type=trial). Views > 'hpo: trials' lists the trials with their metrics; or search tags.run_type = 'trial'."
)


def save_trials_view(tracker, cfg, param_names: Sequence[str], capped: Sequence[str] = ()) -> str:
    """The experiment's saved view "hpo: trials": trial runs only, the study's metric (validation,
    training, their ratio), fit time and the searched parameters as columns (with ``<name>_requested`` beside
    each searched one of ``capped``, the model kind's ``capped_params``), best first. Returns the link that
    opens it on ``mlflow ui``'s default address."""
    metric = str(cfg.study.metric)
    stem = metric.removeprefix("val_")
    metrics = [metric, f"train_{stem}", f"{stem}_ratio", "fit_time_s", *[m for m in cfg.study.objectives if m != metric]]
    params = list(dict.fromkeys([*param_names, *(f"{name}_requested" for name in capped if name in param_names)]))
    ascending = str(cfg.study.direction) == "minimize"
    save_runs_view(
        tracker.client, tracker.experiment_id, TRIALS_VIEW, "hpo: trials", list(dict.fromkeys(metrics)),
        params=params, ascending=ascending, search_filter=TRIAL_FILTER,
    )
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    if NOTE_TAG not in experiment.tags:  # the Description column of the UI's experiment list
        tracker.client.set_experiment_tag(tracker.experiment_id, NOTE_TAG, EXPERIMENT_NOTE)
    return experiment_url(DEFAULT_UI, tracker.experiment_id, TRIALS_VIEW)
