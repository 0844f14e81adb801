"""Experiment tracking flags, checked before Ray starts: ``--mlflow TRACKING_URI`` and
``--wandb PROJECT``.

The logging itself is Ray Tune's own (``MLflowLoggerCallback``, ``WandbLoggerCallback``,
added by :func:`tuner.trainable.tracking_callbacks`): every trial's config as parameters and
each scored epoch's report as metrics, step = epoch. Tune calls its logger callbacks in the driver,
so an MLflow store or server needs to be reachable from the driver only, not from the
workers; W&B runs offline and writes under the run folder on the driver's machine.

>>> check_mlflow_uri("http://mlflow.example:5000")
'http://mlflow.example:5000'
>>> check_mlflow_uri("file:///srv/mlruns"), local_store("file:///srv/mlruns")
('file:///srv/mlruns', PosixPath('/srv/mlruns'))
"""

from __future__ import annotations

import importlib.util
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

from tuner.errors import UsageError

__all__ = ["MLFLOW_INSTALL", "WANDB_INSTALL", "check_mlflow_uri", "check_mlflow_world",
           "check_wandb_project", "check_wandb_world", "installed", "local_store"]

MLFLOW_INSTALL = "pip install -c constraints.txt -e '.[mlflow]' (mlflow-skinny)"
WANDB_INSTALL = "pip install -c constraints.txt -e '.[wandb]'"
SERVER_TIMEOUT_S = 10.0
_SCHEMES = ("file", "sqlite", "http", "https")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):(.*)$")
_PROJECT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}")


def check_mlflow_uri(value: str) -> str:
    """``--mlflow``: an MLflow tracking URI, returned in the form the run uses.

    - a path (``mlruns``, ``~/mlruns``, ``/abs/mlruns``): a file store, made absolute;
    - ``file:///abs/path``: a file store;
    - ``sqlite:///path/to/mlflow.db``: MLflow's database store (its path made absolute);
    - ``http://HOST[:PORT]``, ``https://...``: a tracking server.
    """
    text = str(value).strip()
    match = _URI.match(text)
    if not text or (match is None and "://" in text):
        raise UsageError(f"--mlflow {value!r}: expected a tracking URI: a folder path, "
                         "file:///abs/path, sqlite:///path/mlflow.db or http(s)://HOST:PORT")
    if match is None or len(match.group(1)) == 1:  # a path (C:\... is not a scheme either)
        return str(Path(text).expanduser().absolute())
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme not in _SCHEMES:
        raise UsageError(f"--mlflow {value!r}: unsupported scheme {scheme}: expected a folder "
                         "path, file:///abs/path, sqlite:///path/mlflow.db or http(s)://HOST:PORT")
    if scheme == "file":
        if not rest.startswith("///") or not rest.strip("/"):
            raise UsageError(f"--mlflow {value!r}: a file URI needs an absolute path "
                             "(file:///abs/path)")
        return text
    if scheme == "sqlite":
        if not rest.startswith("///") or not rest[3:].strip():
            raise UsageError(f"--mlflow {value!r}: expected sqlite:///path/to/mlflow.db")
        return "sqlite:///" + str(Path(rest[3:]).expanduser().absolute())
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        parts = None
    if parts is None or not parts.hostname:
        raise UsageError(f"--mlflow {value!r}: expected {scheme}://HOST[:PORT][/PATH]")
    return text


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found, not imported: MLflow takes seconds)."""
    return importlib.util.find_spec(module) is not None


def local_store(uri: str) -> Path | None:
    """The folder (file store) or database file (sqlite) of a checked URI; None for a server."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None if "://" in uri else Path(uri)


def check_mlflow_world(uri: str) -> Path | None:
    """MLflow is installed and a server answers, else one line; returns the folder a local
    store writes in (for ``tuner.spec.check_writable``), None for a server."""
    if not installed("mlflow"):
        raise UsageError(f"--mlflow {uri}: MLflow is not installed: expected {MLFLOW_INSTALL}")
    store = local_store(uri)
    if store is None:
        _check_server(uri)
        return None
    database = uri.startswith("sqlite:")
    if store.exists() and store.is_dir() == database:
        what = "a database file" if database else "a folder (MLflow's file store)"
        raise UsageError(f"--mlflow {uri}: {store} exists and is not {what}")
    return store.parent if database else store


def _check_server(uri: str) -> None:
    parts = urlsplit(uri)
    host = str(parts.hostname)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=SERVER_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = f"no answer within {SERVER_TIMEOUT_S:g} s" if isinstance(exc, TimeoutError) \
            else exc.strerror or exc
        raise UsageError(f"--mlflow {uri}: no MLflow server answers at {host}:{port} "
                         f"({reason}); expected a running tracking server") from None


def check_wandb_project(value: str) -> str:
    """``--wandb``: a W&B project name (W&B refuses ``/ \\ # ? % :``; this asks for less)."""
    text = str(value).strip()
    if not _PROJECT.fullmatch(text):
        raise UsageError(f"--wandb {value!r}: expected a W&B project name: 1 to 128 letters, "
                         "digits, '.', '_' or '-', starting with a letter or digit")
    return text


def check_wandb_world(project: str) -> None:
    """wandb is installed (its offline runs go under the run folder, checked with it)."""
    if not installed("wandb"):
        raise UsageError(f"--wandb {project}: wandb is not installed: expected {WANDB_INSTALL}")
