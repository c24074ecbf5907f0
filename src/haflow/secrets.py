"""Cluster secrets: generated once per cluster, stored 0600 in the state directory, reused.

Later layers add their accounts to `ACCOUNTS`; an existing file gains only the ones never
generated, so a password never changes under a running cluster. A secret that was generated
once (the state record lists it) and is gone is an error, never silently replaced.
"""

from __future__ import annotations

import base64
import secrets as _random
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

from haflow.errors import UserError
from haflow.fsutil import atomic_write

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
    "haproxy_stats": "haflow",
    "pooler_admin": "pgbouncer",
    "etcd_root": "root",
    "etcd_patroni": "patroni",
    "etcd_elector": "dag-processor-elector",
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
    def ensure(cls, state_dir: Path, recorded: set[str], has_data: bool, regenerate: bool = False) -> tuple["Secrets", list[str]]:
        """The cluster's secrets, generating those that were never generated.

        `recorded`: the names the state record says were generated for this cluster; `has_data`:
        whether the cluster already exists. A secret that was generated but is gone (file
        deleted, emptied, truncated, damaged) is never silently replaced: that would lock the
        cluster out of its own databases. Only `regenerate=True` (an explicit flag) does.
        Returns the secrets and the names newly generated."""
        path = state_dir / FILE_NAME
        stored, stored_keys = cls._read_checked(path, recorded, has_data, regenerate)
        accounts, keys = dict(stored), dict(stored_keys)
        for key, username in ACCOUNTS.items():
            accounts.setdefault(key, Account(username, _new_password()))
        for name, make in KEYS.items():
            if name not in keys:
                keys[name] = make()
        new = sorted(set(accounts) - set(stored) | set(keys) - set(stored_keys))
        if new or (path.exists() and path.stat().st_mode & 0o077):
            atomic_write(path, yaml.safe_dump(cls(accounts, keys)._document(), sort_keys=True), 0o600)
        return cls(accounts, keys), new

    @classmethod
    def load(cls, state_dir: Path, recorded: set[str], has_data: bool) -> "Secrets":
        """The secrets of an existing cluster, for commands that create nothing."""
        if not has_data and not (state_dir / FILE_NAME).exists():
            raise UserError(f"no cluster in {state_dir} yet, so it has no secrets; run `haflow up` first "
                            "(or point --state-dir at the cluster's state directory)")
        return cls.ensure(state_dir, recorded, has_data)[0]

    @classmethod
    def _read_checked(cls, path: Path, recorded: set[str], has_data: bool,
                      regenerate: bool) -> tuple[dict[str, Account], dict[str, str]]:
        if not path.exists():
            if has_data and not regenerate:
                raise UserError(f"{path} is missing but the cluster's data exists: restore the file from a backup "
                                f"(it holds every password of the cluster), or {REGENERATE_HINT}")
            return {}, {}
        try:
            accounts, keys = cls._read(path)
        except UserError:
            if not regenerate:
                raise
            return {}, {}
        expected = set(recorded)
        if not expected and has_data and not accounts and not keys:  # an older cluster, no record
            expected = set(ACCOUNTS) | set(KEYS)
        lost = sorted(expected - set(accounts) - set(keys))
        if lost and not regenerate:
            raise UserError(f"{path} lacks {', '.join(lost)}, generated for this cluster earlier: restore the file "
                            f"from a backup, or {REGENERATE_HINT}")
        return accounts, keys

    @staticmethod
    def _read(path: Path) -> tuple[dict[str, Account], dict[str, str]]:
        try:
            data = yaml.safe_load(path.read_text())
            if not isinstance(data, dict):
                raise TypeError("not a mapping")
            keys = {str(k): str(v) for k, v in (data.pop("keys", None) or {}).items()}
            return {str(k): Account(str(v["username"]), str(v["password"])) for k, v in data.items()}, keys
        except (yaml.YAMLError, KeyError, TypeError, AttributeError, UnicodeDecodeError, OSError):
            raise UserError(
                f"{path}: the secrets file is damaged; restore it from a backup (the cluster's passwords live "
                f"there), or {REGENERATE_HINT}"
            ) from None

    def names(self) -> list[str]:
        return sorted([*self._accounts, *self._keys])

    @classmethod
    def placeholders(cls) -> "Secrets":
        """Stand-ins for a dry run before the first deploy: nothing is generated or written."""
        return cls({k: Account(u, "(generated at deploy)") for k, u in ACCOUNTS.items()},
                   {name: "(generated at deploy)" for name in KEYS})


# What replacing each secret breaks: said by --regenerate-secrets' help and its errors.
BREAKS = {
    "postgres_superuser": "Patroni's own login to PostgreSQL (reset the role's password by hand)",
    "postgres_replication": "streaming replication (reset the role's password by hand)",
    "postgres_rewind": "pg_rewind of a returning node (reset the role's password by hand)",
    "airflow_fernet_key": "every connection and variable Airflow stored encrypted",
    "etcd_root": "haflow's own etcd login (reset it with `etcdctl user passwd root`)",
}
REGENERATE_HINT = ("run `haflow up --regenerate-secrets` to generate new ones (it breaks "
                   + "; ".join(BREAKS.values()) + ")")
