"""``python -m hpo dashboard``: optuna-dashboard on the config's study storage.

The dashboard reads ``study.storage`` directly (every study in it, live while workers write), so it
needs no MLflow; ``mlflow ui`` shows the same trials with their artifacts. It binds to
``dashboard.host`` (127.0.0.1 by default: the dashboard has write actions and no login).
"""

from __future__ import annotations

from omegaconf import DictConfig

from hpo.atomic import sqlite_file
from hpo.config import ConfigError
from hpo.redact import redact


def dashboard(cfg: DictConfig) -> None:
    import optuna
    from optuna_dashboard import run_server

    from hpo.search.storage import make_storage

    url = str(cfg.study.storage)
    database = sqlite_file(url)
    if database is not None and not database.is_file():
        raise ConfigError(f"study.storage={redact(url)!r}: no study database there yet; run `python -m hpo optimize` first")
    storage = make_storage(url, cfg.study.heartbeat_s, cfg.study.grace_s)
    names = [s.study_name for s in optuna.get_all_studies(storage)]
    host, port = str(cfg.dashboard.host), int(cfg.dashboard.port)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"[hpo] optuna-dashboard of {redact(url)} ({len(names)} studies: {', '.join(names) or 'none yet'})\n"
        f"[hpo] open http://{shown}:{port}/dashboard/ ; Ctrl-C stops it",
        flush=True,
    )
    try:
        run_server(storage, host=host, port=port)
    except KeyboardInterrupt:
        print("[hpo] dashboard stopped", flush=True)
    except OSError as exc:  # port taken, address not of this machine
        raise ConfigError(f"dashboard.host={host!r} dashboard.port={port}: cannot listen there ({exc}); pick another port, e.g. dashboard.port={port + 1}") from None
