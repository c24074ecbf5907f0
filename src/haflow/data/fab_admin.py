"""Create or repair the FAB auth manager's admin user (run by `haflow up` with the Airflow venv).

The password comes from the environment (HAFLOW_ADMIN_PASSWORD), never the command line, where
every local user could read it in `ps`. Prints what it did: created, reset or unchanged.
"""

import os
import sys

from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder
from werkzeug.security import check_password_hash


def main() -> int:
    username, email = sys.argv[1], sys.argv[2]
    password = os.environ["HAFLOW_ADMIN_PASSWORD"]
    with get_application_builder() as appbuilder:
        sm = appbuilder.sm
        role = sm.find_role("Admin")
        if role is None:
            print("the FAB Admin role does not exist (was `airflow db migrate` run?)", file=sys.stderr)
            return 1
        user = sm.find_user(username=username)
        if user is None:
            if not sm.add_user(username, "haflow", "admin", email, role, password):
                print(f"could not create user {username}", file=sys.stderr)
                return 1
            print("created")
        elif not check_password_hash(user.password, password) or role not in user.roles:
            if role not in user.roles:
                user.roles = [*user.roles, role]
                sm.update_user(user)
            sm.reset_password(user.id, password)
            print("reset")
        else:
            print("unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
