"""Credentials never printed or stored: URLs are shown with their password replaced by ***.

Storage URLs (``postgresql://alice:PW@host/db``) and tracking URIs (``https://user:PW@host``) may
carry a password. Everything hpo prints, tags, logs as a parameter or writes as an artifact goes
through ``redact`` (one URL) or ``redact_text`` (any text that may contain one), so the password
exists only in the config the user gave and in the connection itself.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

# user:password@ inside any scheme://... URL
_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@")


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (SQLAlchemy and http URLs alike)."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(url))


def password_of(url: str) -> str | None:
    """The password inside ``url``, if any."""
    try:
        return urlsplit(str(url)).password
    except ValueError:
        return None


def redact_text(text: str, *urls: str) -> str:
    """``text`` with every URL's credentials redacted, and the passwords of ``urls`` removed wherever
    they appear (drivers quote them in their own error messages)."""
    text = redact(str(text))
    for url in urls:
        password = password_of(url)
        if password:
            text = text.replace(password, "***")
    return text


def silence_run_urls() -> None:
    """MLflow prints "View run NAME at: URL" on stdout when a run on a tracking server ends, the URL
    being the tracking URI itself, credentials included (mlflow.tracking._tracking_service.client
    ``_log_url``, called by ``set_terminated``). hpo prints its own run ids; MLflow's documented
    switch turns those lines off (for this process and the workers it spawns)."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
