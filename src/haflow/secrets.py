"""Cluster secrets: generated once per cluster, stored 0600 in the state directory, reused.

Later layers add their accounts to `ACCOUNTS`; an existing file gains only the missing ones,
so a password never changes under a running cluster.
"""

from __future__ import annotations

import base64
import os
import secrets as _random
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from haflow.errors import UserError

FILE_NAME = "secrets.yaml"

# account key -> fixed username (the password is generated)
ACCOUNTS: dict[str, str] = {
    "postgres_superuser": "postgres",
    "postgres_replication": "replicator",
    "postgres_rewind": "rewinder",
    "postgres_airflow": "airflow",
    "patroni_restapi": "patroni",
    "rabbitmq_admin": "admin",
    "rabbitmq_airflow": "airflow",
    "airflow_admin": "admin",
}


def _fernet_key() -> str:
    return base64.urlsafe_b64encode(_random.token_bytes(32)).decode()


def _erlang_cookie() -> str:
    return "".join(_random.choice(string.ascii_uppercase) for _ in range(32))


# Keys shared by every process of a layer (not accounts): generated once like passwords.
KEYS = {
    "erlang_cookie": _erlang_cookie,
    "airflow_fernet_key": _fernet_key,
    "airflow_jwt_secret": lambda: _random.token_urlsafe(32),
    "airflow_api_secret_key": lambda: _random.token_urlsafe(32),
}


@dataclass(frozen=True)
class Account:
    username: str
    password: str


def _new_password() -> str:
    # URL-safe: these passwords end up in connection URLs and config files unquoted.
    return _random.token_urlsafe(24)


def _write_0600(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class Secrets:
    def __init__(self, accounts: dict[str, Account], keys: dict[str, str] | None = None) -> None:
        self._accounts = accounts
        self._keys = keys or {}

    def __getitem__(self, key: str) -> Account:
        return self._accounts[key]

    def key(self, name: str) -> str:
        return self._keys[name]

    def as_dict(self) -> dict[str, dict[str, str]]:
        """Every account as {username, password} (the stable `secrets show --json`)."""
        return {k: {"username": a.username, "password": a.password} for k, a in sorted(self._accounts.items())}

    def keys_dict(self) -> dict[str, str]:
        return dict(sorted(self._keys.items()))

    def _document(self) -> dict[str, object]:
        return {**self.as_dict(), "keys": self.keys_dict()}

    @classmethod
    def load_or_create(cls, state_dir: Path) -> "Secrets":
        """Load the cluster's secrets, generating (and storing) any that are missing."""
        path = state_dir / FILE_NAME
        stored, stored_keys = cls._read(path) if path.exists() else ({}, {})
        accounts, keys = dict(stored), dict(stored_keys)
        for key, username in ACCOUNTS.items():
            if key not in accounts:
                accounts[key] = Account(username, _new_password())
        for name, make in KEYS.items():
            if name not in keys:
                keys[name] = make()
        if accounts != stored or keys != stored_keys or (path.exists() and path.stat().st_mode & 0o077):
            _write_0600(path, yaml.safe_dump(cls(accounts, keys)._document(), sort_keys=True))
        return cls(accounts, keys)

    @staticmethod
    def _read(path: Path) -> tuple[dict[str, Account], dict[str, str]]:
        try:
            data = yaml.safe_load(path.read_text()) or {}
            keys = {str(k): str(v) for k, v in (data.pop("keys", None) or {}).items()}
            return {k: Account(str(v["username"]), str(v["password"])) for k, v in data.items()}, keys
        except (yaml.YAMLError, KeyError, TypeError, AttributeError):
            raise UserError(
                f"{path}: the secrets file is damaged; restore it from a backup (the cluster's "
                "passwords live there) or, for a cluster you will purge, delete it"
            ) from None
