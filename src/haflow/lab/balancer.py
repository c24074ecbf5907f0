"""The lab's stand-in for a cloud load balancer: one more lab host running the distro's HAProxy,
configured only from `haflow lb settings` (what a user would type into their cloud console),
so that `haflow lb check` is tested against a balancer haflow does not run itself.

HAProxy proxies (the PostgreSQL servers see the balancer's address, not the client's), so the
lab's spec admits the balancer's address in `database.allowed_clients`.
"""

from __future__ import annotations

from typing import Any

NAME = "lb1"
ADDRESS_INDEX = 50  # 10.213.0.60: clear of the nodes (lab1 = .11 ...)
CONFIG = "/etc/haflow-lab-balancer.cfg"
UNIT = "haflow-lab-balancer.service"


def haproxy_config(settings: dict[str, Any]) -> str:
    """An HAProxy configuration that does what each service of `settings` asks: listen port,
    targets, HTTP health check (port, path, expected status, interval, timeout, thresholds), and
    closing the connections to a target that turns unhealthy when asked."""
    lines = [
        f"# haflow lab: the stand-in cloud balancer for cluster {settings['cluster']}, from `haflow lb settings`",
        "global",
        "    maxconn 2000",
        "defaults",
        "    mode tcp",
        "    timeout connect 4s",
        "    timeout client 30m",
        "    timeout server 30m",
    ]
    for svc in settings["services"]:
        hc = svc["health_check"]
        close = " on-marked-down shutdown-sessions" if svc["close_connections_to_unhealthy_targets"] else ""
        lines += [
            "",
            f"listen {svc['name']}",
            f"    bind *:{svc['listen_port']}",
            f"    timeout check {hc['timeout_s']}s",
            "    option httpchk",
            f"    http-check send meth GET uri {hc['path']}",
            f"    http-check expect status {hc['expect_status']}",
            f"    default-server inter {hc['interval_s']}s fall {hc['unhealthy_threshold']} rise {hc['healthy_threshold']}{close}",
            *[f"    server {t['node']} {t['address']}:{t['port']} check port {hc['port']}" for t in svc["targets"]],
        ]
    return "\n".join(lines) + "\n"


def unit_text() -> str:
    return ("[Unit]\nDescription=haflow lab stand-in cloud load balancer\nAfter=network-online.target\n\n"
            f"[Service]\nExecStart=/usr/sbin/haproxy -W -db -f {CONFIG}\nExecReload=/bin/kill -USR2 $MAINPID\n"
            "Restart=on-failure\n\n[Install]\nWantedBy=multi-user.target\n")


def install_script(config: str) -> str:
    """Shell run on the balancer host as root: HAProxy from the host's apt (its own service
    disabled), the configuration and a unit of ours, started (restarted when it changed)."""
    return (
        "set -e\n"
        "if ! command -v haproxy >/dev/null; then\n"
        "  export DEBIAN_FRONTEND=noninteractive\n"
        "  apt-get update -qq >/dev/null\n"
        "  apt-get install -y -qq --no-install-recommends haproxy >/dev/null\n"
        "  systemctl disable --now haproxy.service >/dev/null 2>&1 || true\n"
        "fi\n"
        f"cat > {CONFIG}.new <<'HAFLOW_EOF'\n{config}HAFLOW_EOF\n"
        f"haproxy -c -q -f {CONFIG}.new\n"
        f"changed=1; cmp -s {CONFIG}.new {CONFIG} && changed=0\n"
        f"mv -f {CONFIG}.new {CONFIG}\n"
        f"cat > /etc/systemd/system/{UNIT} <<'HAFLOW_EOF'\n{unit_text()}HAFLOW_EOF\n"
        "systemctl daemon-reload\n"
        f"systemctl enable -q {UNIT}\n"
        f"if [ $changed = 1 ]; then systemctl restart {UNIT}; else systemctl start {UNIT}; fi\n"
        f"systemctl is-active -q {UNIT}\n"
    )
