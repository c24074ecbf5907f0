"""The errors a user can meet, each with the exit code of the CLI contract (design.md §4)."""

from __future__ import annotations


class HaflowError(Exception):
    """An error the CLI prints as one line (never a traceback) and exits with `exit_code`."""

    exit_code = 1

    def __init__(self, message: str, *, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class UserError(HaflowError):
    """Bad input: a spec error, an unknown node, a missing prerequisite. Exit code 2."""

    exit_code = 2


class SpecError(UserError):
    """The spec is invalid; `details` holds one line per problem, each naming its field path."""


class ClusterUnhealthy(HaflowError):
    """The cluster did not reach (or is not in) a healthy state. Exit code 1."""

    exit_code = 1
