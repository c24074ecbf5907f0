import stat

import pytest

from haflow.errors import UserError
from haflow.secrets import ACCOUNTS, Secrets


def test_generated_once_stored_0600_and_stable(tmp_path):
    first = Secrets.load_or_create(tmp_path)
    path = tmp_path / "secrets.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Secrets.load_or_create(tmp_path)
    assert first.as_dict() == again.as_dict()
    assert set(first.as_dict()) == set(ACCOUNTS)
    passwords = [a["password"] for a in first.as_dict().values()]
    assert len(set(passwords)) == len(passwords) and all(len(p) >= 24 for p in passwords)


def test_missing_accounts_are_added_existing_kept(tmp_path):
    path = tmp_path / "secrets.yaml"
    path.write_text("postgres_superuser: {username: postgres, password: keepme}\n")
    s = Secrets.load_or_create(tmp_path)
    assert s["postgres_superuser"].password == "keepme"
    assert set(s.as_dict()) == set(ACCOUNTS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_loose_permissions_are_tightened(tmp_path):
    Secrets.load_or_create(tmp_path)
    path = tmp_path / "secrets.yaml"
    path.chmod(0o644)
    Secrets.load_or_create(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_damaged_file_is_a_clear_error(tmp_path):
    (tmp_path / "secrets.yaml").write_text("[not, a, mapping")
    with pytest.raises(UserError) as e:
        Secrets.load_or_create(tmp_path)
    assert "damaged" in e.value.message
