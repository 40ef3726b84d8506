"""Credentials out of everything distvi writes: URLs with ``user:password@`` lose the password.

distvi records where a run went (the job config, MLflow params and tags, warnings, the
command's output). A tracking URI such as ``https://alice:s3cret@mlflow.example`` or an
fsspec URL with keys in it must not carry its secret into any of them. Every string distvi
writes out passes through :func:`redact`; the password becomes ``***`` and the user name is
kept (it says which account, not how to use it).

Examples
--------
>>> redact("https://alice:s3cret@mlflow.example:5000/api")
'https://alice:***@mlflow.example:5000/api'
>>> redact("sqlite:///mlflow.db")
'sqlite:///mlflow.db'
>>> strip_credentials("https://alice:***@mlflow.example")
'https://mlflow.example'
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# scheme://user:password@ -- the password is anything up to the last '@' before the path
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^/@:\s'\"]*):"
                       r"(?P<secret>[^/\s'\"]*)@")


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` replaced by ``***``."""
    if not isinstance(text, str) or "@" not in text:
        return text
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)


def redact_obj(value: Any) -> Any:
    """A copy of nested dicts/lists/tuples with every string (and key) redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_obj(k): redact_obj(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_obj(v) for v in value)
    return value


def strip_credentials(uri: str) -> str:
    """``uri`` without its ``user:password@`` part (for a URI read back after redaction: the
    credentials then come from the environment, e.g. ``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD``)."""
    if not isinstance(uri, str):
        return uri
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]*@", r"\1", uri)
