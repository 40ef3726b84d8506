"""Credentials out of everything distvi writes: URLs lose their passwords and secret keys.

distvi records where a run went (the job config, the data description, MLflow params and
tags, warnings, the command's output). A tracking URI such as
``https://alice:s3cret@mlflow.example`` or an fsspec URL with keys in it must not carry its
secret into any of them. Every string distvi writes out passes through :func:`redact`:

- ``user:password@`` keeps the user name and masks the password (``alice:***@``); a user
  part without a password (often a bare token, ``https://TOKEN@host``) is masked whole;
- query parameters that carry secrets (``token``, ``sig``, ``key``, ``password``,
  ``X-Amz-Signature`` ...) keep their names and mask their values.

Examples
--------
>>> redact("https://alice:s3cret@mlflow.example:5000/api")
'https://alice:***@mlflow.example:5000/api'
>>> redact("https://alice@corp.com:pw@host/x and https://TOKEN@host")
'https://alice@corp.com:***@host/x and https://***@host'
>>> redact("https://acct.blob.example/c?sv=1&sig=abc&se=2")
'https://acct.blob.example/c?sv=1&sig=***&se=2'
>>> redact("sqlite:///mlflow.db")
'sqlite:///mlflow.db'
>>> strip_credentials("https://alice:***@mlflow.example")
'https://mlflow.example'
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s<>\"'`]+")
_SECRET_KEYS = re.compile(r"(?i)(^|[?&;])((?:[\w.\-]*?(?:token|secret|password|passwd|pwd|sig|"
                          r"signature|credential|apikey|api_key|access_key|key))=)([^&;#]*)")


def _split(url: str) -> tuple[str, str, str]:
    """``scheme``, the authority (``user:password@host:port``) and the rest of a URL."""
    scheme, _, rest = url.partition("://")
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    return scheme, rest[:cut], rest[cut:]


def _redact_url(url: str) -> str:
    scheme, netloc, tail = _split(url)
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":") if "@" not in userinfo else userinfo.rpartition(":")
        netloc = f"{user}:{MASK}@{host}" if colon and user else f"{MASK}@{host}"
    if "?" in tail:
        path, _, query = tail.partition("?")
        tail = path + "?" + _SECRET_KEYS.sub(lambda m: f"{m[1]}{m[2]}{MASK}", query)
    return f"{scheme}://{netloc}{tail}"


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it masked (see the module docstring)."""
    if not isinstance(text, str) or "://" not in text:
        return text
    return _URL.sub(lambda m: _redact_url(m[0]), text)


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
    ``MLFLOW_TRACKING_PASSWORD``, or fsspec's own configuration)."""
    if not isinstance(uri, str) or "://" not in uri:
        return uri
    scheme, netloc, tail = _split(uri)
    return f"{scheme}://{netloc.rsplit('@', 1)[-1]}{tail}"


def strip_masked(value: Any) -> Any:
    """A copy of a recorded (redacted) config in which every URL whose credentials were masked
    has them removed, so that the environment can supply them."""
    if isinstance(value, str):
        return strip_credentials(value) if MASK + "@" in value else value
    if isinstance(value, dict):
        return {k: strip_masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_masked(v) for v in value]
    return value
