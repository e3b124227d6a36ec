"""``python -m hpo dashboard``: a live view of the Optuna studies (trials, history, importances) in a browser.

Serves optuna-dashboard on ``dashboard.host``:``dashboard.port`` (conf/dashboard/default.yaml) for
``study.storage`` while workers keep writing to it; runs until Ctrl-C. ``mlflow ui`` shows the same
trials with their artifacts and the models.

The dashboard has no login and can *change* the storage (rename or delete a study, tell trials,
write notes), so it binds to the loopback address by default; reach it from another machine through
``ssh -L PORT:127.0.0.1:PORT`` rather than binding to 0.0.0.0. (After hpo.dashboard of the
secrets-ui branch.)
"""

from __future__ import annotations

import sys
from pathlib import Path

from hpo.errors import ConfigError
from hpo.redact import redact, redact_text

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class DashboardError(ConfigError):
    """The dashboard cannot start: package missing, storage unreadable, bad port."""


def open_storage(url: str):
    """A read/write Optuna storage for a dashboard: unlike a worker it never creates a new file."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url.removeprefix("journal:")).expanduser()
        if not path.is_file():
            raise DashboardError(f"study.storage={url!r}: no journal file at {path}; run `python -m hpo optimize` first")
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///")).expanduser()
        if not path.is_file():
            raise DashboardError(f"study.storage={url!r}: no database at {path}; run `python -m hpo optimize` first")
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as exc:  # driver missing, server down, wrong password: never echo the URL's secrets
        raise DashboardError(f"study.storage={redact(url)!r} cannot be opened: {redact_text(str(exc), url)}") from None


def dashboard(cfg) -> None:
    """Serve the dashboard for ``cfg.study.storage`` until Ctrl-C; print its URL first."""
    try:
        import optuna_dashboard
    except ImportError:
        raise DashboardError("the dashboard needs optuna-dashboard: pip install optuna-dashboard (a dependency of hpo)") from None
    import optuna

    url = str(cfg.study.storage)
    host, port = str(cfg.dashboard.host), cfg.dashboard.port
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise DashboardError(f"dashboard.port={port!r} is not allowed: an integer in 1..65535")
    storage = open_storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"[hpo] optuna-dashboard of {redact(url)} ({len(names)} studies: {', '.join(names) or 'none yet'})\n"
        f"[hpo] open http://{shown}:{port}/dashboard (Ctrl-C stops it)",
        flush=True,
    )
    if host not in LOOPBACK:
        print(
            f"[hpo] warning: dashboard.host={host} is reachable from other machines; the dashboard has no login "
            "and can rename or delete studies",
            file=sys.stderr,
            flush=True,
        )
    try:
        serve(optuna_dashboard.wsgi(storage), host, port)
    except OSError as exc:  # port in use, address not on this machine
        raise DashboardError(f"dashboard cannot listen on {host}:{port} ({exc}); pick another, e.g. dashboard.port={port + 1}") from None
    print("[hpo] dashboard stopped", flush=True)


def serve(app, host: str, port: int) -> None:
    """Serve ``app`` until Ctrl-C or SIGTERM, then stop between requests (optuna_dashboard.run_server would
    let the signal interrupt a response half written, and logs every request)."""
    import signal
    import socket
    import threading
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Quiet(WSGIRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 - the signature of BaseHTTPRequestHandler
            pass

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = make_server(host, port, app, server_class=Server, handler_class=Quiet)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=server.serve_forever, name="dashboard", daemon=True)
    thread.start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.shutdown()
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
