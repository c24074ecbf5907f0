"""Secrets: generated once, stored 0600, and never silently replaced once a cluster exists."""

import stat

import pytest

from haflow.errors import UserError
from haflow.secrets import ACCOUNTS, KEYS, Secrets

ALL = set(ACCOUNTS) | set(KEYS)


def test_generated_once_stored_0600_and_stable(tmp_path):
    first, new = Secrets.ensure(tmp_path, set(), has_data=False)
    assert set(new) == ALL
    path = tmp_path / "secrets.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again, new_again = Secrets.ensure(tmp_path, set(first.names()), has_data=True)
    assert first.as_dict() == again.as_dict() and new_again == []
    assert set(first.as_dict()) == set(ACCOUNTS)
    passwords = [a["password"] for a in first.as_dict().values()]
    assert len(set(passwords)) == len(passwords) and all(len(p) >= 24 for p in passwords)


def test_accounts_never_generated_are_added_existing_kept(tmp_path):
    """An older cluster's file lacks accounts a newer haflow added: those are generated."""
    path = tmp_path / "secrets.yaml"
    path.write_text("postgres_superuser: {username: postgres, password: keepme}\n")
    s, new = Secrets.ensure(tmp_path, {"postgres_superuser"}, has_data=True)
    assert s["postgres_superuser"].password == "keepme"
    assert set(s.as_dict()) == set(ACCOUNTS) and "postgres_superuser" not in new
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_loose_permissions_are_tightened(tmp_path):
    s, _ = Secrets.ensure(tmp_path, set(), has_data=False)
    path = tmp_path / "secrets.yaml"
    path.chmod(0o644)
    Secrets.ensure(tmp_path, set(s.names()), has_data=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("damage", ["delete", "empty", "truncate", "garbage", "not-a-mapping"])
def test_lost_secrets_of_an_existing_cluster_are_an_error_and_never_replaced(tmp_path, damage):
    s, _ = Secrets.ensure(tmp_path, set(), has_data=False)
    path = tmp_path / "secrets.yaml"
    text = path.read_text()
    {"delete": lambda: path.unlink(),
     "empty": lambda: path.write_text(""),
     "truncate": lambda: path.write_text(text[: len(text) // 3].rsplit("\n", 1)[0] + "\n"),
     "garbage": lambda: path.write_text("{{{ not yaml"),
     "not-a-mapping": lambda: path.write_text("[a, b]\n")}[damage]()
    before = path.read_bytes() if path.exists() else None
    for load in (lambda: Secrets.ensure(tmp_path, set(s.names()), has_data=True),
                 lambda: Secrets.load(tmp_path, set(s.names()), has_data=True)):
        with pytest.raises(UserError) as e:
            load()
        assert "restore" in e.value.message and "--regenerate-secrets" in e.value.message
        assert (path.read_bytes() if path.exists() else None) == before  # nothing rewritten


def test_an_older_cluster_without_a_record_and_an_empty_file_is_an_error(tmp_path):
    (tmp_path / "secrets.yaml").write_text("{}\n")
    with pytest.raises(UserError) as e:
        Secrets.ensure(tmp_path, set(), has_data=True)
    assert "lacks" in e.value.message


def test_regenerate_replaces_only_what_is_missing(tmp_path):
    s, _ = Secrets.ensure(tmp_path, set(), has_data=False)
    path = tmp_path / "secrets.yaml"
    keep = s["rabbitmq_admin"].password
    text = path.read_text()
    path.write_text("\n".join(l for l in text.splitlines() if not l.startswith("postgres_superuser") and "password: " + s["postgres_superuser"].password not in l) + "\n")
    s2, new = Secrets.ensure(tmp_path, set(s.names()), has_data=True, regenerate=True)
    assert new == ["postgres_superuser"]
    assert s2["rabbitmq_admin"].password == keep
    assert s2["postgres_superuser"].password != s["postgres_superuser"].password


def test_no_cluster_has_no_secrets_to_show(tmp_path):
    with pytest.raises(UserError) as e:
        Secrets.load(tmp_path / "nothing", set(), has_data=False)
    assert "no cluster" in e.value.message and "haflow up" in e.value.message
    assert not (tmp_path / "nothing").exists()
