"""Credentials in storage options and messages: which options hold one, and redaction of any text.

Credentials never reach logs, errors, manifests or model cards: every message the storage layer
produces passes through `redact`, which knows the options' credential values and the AWS_*
credential variables of the environment, and masks URL passwords and request signatures.

A credential is a secret (secret key, token, password, ...) or an access key id: an id alone
cannot sign a request, but it names the account and is half of the pair, so it is treated the
same everywhere: redacted in what is printed or written, and refused in flow parameters.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "***"
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
"""Environment variables holding credentials; their values are masked in every redacted text."""
_SECRET_WORDS = (
    "secret", "token", "password", "passphrase", "credential", "account_key", "sas", "access_key",
    "api_key", "apikey", "private_key", "connection_string", "authorization",
)  # fmt: skip
_SECRET_NAMES = ("key",)
"""Names that are credentials only as a whole word (s3fs's access key id is the option `key`)."""
_USERINFO = re.compile(r"(\b[A-Za-z][\w+.-]*://[^/\s:@]*:)[^/\s@]+@")
_SIGNED_QUERY = re.compile(
    r"\b(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|sig|token)=[^&\s\"']+", re.I
)


def is_secret_option(name: str) -> bool:
    """Whether a storage option (or environment variable) of this name holds a credential.

    Secrets (secret, token, password, account_key, sas_token, connection_string, ...) and access
    key ids (`key`, `aws_access_key_id`, `access_key`, ...) both count.
    """
    lowered = str(name).lower()
    return lowered in _SECRET_NAMES or any(word in lowered for word in _SECRET_WORDS)


def secret_values(options: Mapping[str, Any]) -> list[str]:
    """The secret strings among `options` (nested mappings included) and the secret AWS_* variables."""
    found = [os.environ.get(name, "") for name in SECRET_ENV]
    for name, value in options.items():
        if isinstance(value, Mapping):
            found += secret_values(value)
        elif isinstance(value, str) and is_secret_option(name):
            found.append(value)
    return [value for value in found if len(value) >= 4]


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with known secret values, URL passwords and request signatures replaced by '***'.

    Known secrets are `secrets` plus AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN from the environment.
    """
    values = {value for value in (*secrets, *(os.environ.get(n, "") for n in SECRET_ENV)) if len(value) >= 4}
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    text = _USERINFO.sub(rf"\1{REDACTED}@", text)
    return _SIGNED_QUERY.sub(rf"\1={REDACTED}", text)


def redact_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `options` with every secret-named value replaced by '***' (nested mappings too)."""
    clean: dict[str, Any] = {}
    for name, value in options.items():
        if isinstance(value, Mapping):
            clean[name] = redact_options(value)
        elif value is not None and is_secret_option(name):
            clean[name] = REDACTED
        else:
            clean[name] = redact(value) if isinstance(value, str) else value
    return clean
