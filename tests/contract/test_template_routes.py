"""The API's routes in template.yaml: every route the app serves is declared, and API Gateway can build them."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


class _Loader(yaml.SafeLoader):
    """Reads CloudFormation's short tags (!Ref, !Sub, ...) as plain values."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)


def api_routes() -> list[tuple[str, str]]:
    template = yaml.load((ROOT / "template.yaml").read_text(), Loader=_Loader)
    api = template["Resources"]["ApiFunction"]["Properties"]["Events"]
    return [
        (e["Properties"]["Method"].upper(), e["Properties"]["Path"])
        for e in api.values()
        if e["Type"] == "Api"
    ]


def test_one_variable_path_part_per_level():
    """API Gateway refuses sibling resources with different variables ({a} beside {b}): the deploy would fail."""
    children: dict[str, set[str]] = {}
    for _, path in api_routes():
        parts = path.strip("/").split("/")
        for depth, part in enumerate(parts):
            if part.startswith("{"):
                children.setdefault("/".join(parts[:depth]), set()).add(part)
    assert {parent: names for parent, names in children.items() if len(names) > 1} == {}


def test_every_route_the_app_serves_is_declared():
    source = (ROOT / "functions" / "api" / "app.py").read_text()
    served = {
        (method.upper(), re.sub(r"<(\w+)>(:\w+)?", r"{\1}", path))
        for method, path in re.findall(r'@app\.(get|put|post|delete)\(\s*"([^"]+)"', source)
    }
    assert served <= set(api_routes())
