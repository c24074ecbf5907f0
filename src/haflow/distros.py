"""The operating systems haflow runs a cluster on, and what each one's packages provide.

One table, read by both hosts: preflight refuses a release not listed here, and a spec that
leaves `database.postgres_version` empty gets the release's own PostgreSQL (the version its
`postgresql` package depends on), so the same spec works on Debian 12 and Debian 13 alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Distro:
    id: str  # /etc/os-release ID
    version: str  # /etc/os-release VERSION_ID
    name: str
    postgres: int  # the major version of the release's `postgresql` package


SUPPORTED = (
    Distro("debian", "12", "Debian 12 (bookworm)", 15),
    Distro("debian", "13", "Debian 13 (trixie)", 17),
    Distro("ubuntu", "22.04", "Ubuntu 22.04 LTS", 14),
    Distro("ubuntu", "24.04", "Ubuntu 24.04 LTS", 16),
)
FALLBACK_POSTGRES = 15


def find(os_id: str, version: str) -> Distro | None:
    return next((d for d in SUPPORTED if d.id == os_id and d.version == version), None)


def names() -> str:
    return ", ".join(d.name for d in SUPPORTED)


def os_release(path: Path = Path("/etc/os-release")) -> tuple[str, str]:
    """(ID, VERSION_ID) of this machine."""
    values: dict[str, str] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition("=")
            values[key] = value.strip().strip('"')
    except OSError:
        pass
    return values.get("ID", ""), values.get("VERSION_ID", "")


def postgres_version(wanted: int | None, os_id: str, version: str) -> int:
    """The spec's version when it names one, else the release's own."""
    if wanted is not None:
        return wanted
    distro = find(os_id, version)
    return distro.postgres if distro else FALLBACK_POSTGRES
