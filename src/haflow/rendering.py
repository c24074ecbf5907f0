"""Line-format configs (haproxy.cfg, supervisord.conf) come from small Jinja2 templates."""

from __future__ import annotations

from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

_env = Environment(
    loader=PackageLoader("haflow", "templates"),
    undefined=StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,
)


def render_template(name: str, **context: Any) -> str:
    return _env.get_template(name).render(**context)
