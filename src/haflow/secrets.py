"""Cluster secrets: generated once per cluster, stored 0600 in the state directory, reused.

Later layers add their accounts to `ACCOUNTS`; an existing file gains only the missing ones,
so a password never changes under a running cluster.
"""

from __future__ import annotations

import os
import secrets as _random
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
    def __init__(self, accounts: dict[str, Account]) -> None:
        self._accounts = accounts

    def __getitem__(self, key: str) -> Account:
        return self._accounts[key]

    def as_dict(self) -> dict[str, dict[str, str]]:
        return {k: {"username": a.username, "password": a.password} for k, a in sorted(self._accounts.items())}

    @classmethod
    def load_or_create(cls, state_dir: Path) -> "Secrets":
        """Load the cluster's secrets, generating (and storing) any that are missing."""
        path = state_dir / FILE_NAME
        stored = cls._read(path) if path.exists() else {}
        accounts = dict(stored)
        for key, username in ACCOUNTS.items():
            if key not in accounts:
                accounts[key] = Account(username, _new_password())
        if accounts != stored or (path.exists() and path.stat().st_mode & 0o077):
            _write_0600(path, yaml.safe_dump(cls(accounts).as_dict(), sort_keys=True))
        return cls(accounts)

    @staticmethod
    def _read(path: Path) -> dict[str, Account]:
        try:
            data = yaml.safe_load(path.read_text()) or {}
            return {k: Account(str(v["username"]), str(v["password"])) for k, v in data.items()}
        except (yaml.YAMLError, KeyError, TypeError, AttributeError):
            raise UserError(
                f"{path}: the secrets file is damaged; restore it from a backup (the cluster's "
                "passwords live there) or, for a cluster you will purge, delete it"
            ) from None
