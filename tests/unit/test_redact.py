"""Tests of hpo.redact: passwords hidden everywhere, MLflow's run URLs silenced."""

from __future__ import annotations

from hpo.redact import redact, redact_text


def test_mlflow_run_urls_silenced(monkeypatch):
    """MLflow prints "View run ... at: <tracking URI>" (credentials included) when a server run ends;
    hpo sets MLflow's switch that turns it off."""
    from hpo.redact import silence_run_urls
    from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    silence_run_urls()
    assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get() is True


def test_redaction_hides_passwords_everywhere():
    url = "postgresql://alice:PLANTED@db.example:5432/hpo"
    assert "PLANTED" not in redact(url) and redact(url) == "postgresql://alice:***@db.example:5432/hpo"
    assert redact("https://bob:PLANTED@mlflow.example") == "https://bob:***@mlflow.example"
    assert redact("sqlite:///experiments/optuna.db") == "sqlite:///experiments/optuna.db"
    assert "PLANTED" not in redact_text("password authentication failed: PLANTED", url)
