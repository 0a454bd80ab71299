"""The state machines as deployed: every task has a function and a handler, retries and a way out."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
MACHINES = {
    "MigrationStateMachine": ROOT / "statemachines" / "migration.asl.json",
    "MigrationRollbackStateMachine": ROOT / "statemachines" / "rollback.asl.json",
}


class _Loader(yaml.SafeLoader):
    """CloudFormation's short tags as (tag, value) pairs."""


def _tagged(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode):
        return (suffix, loader.construct_scalar(node))
    if isinstance(node, yaml.SequenceNode):
        return (suffix, loader.construct_sequence(node))
    return (suffix, loader.construct_mapping(node))


_Loader.add_multi_constructor("!", _tagged)


def _template() -> dict:
    return yaml.load((ROOT / "template.yaml").read_text(), Loader=_Loader)


def test_every_placeholder_is_substituted_with_a_migration_function():
    resources = _template()["Resources"]
    for name, path in MACHINES.items():
        props = resources[name]["Properties"]
        assert props["DefinitionUri"] == str(path.relative_to(ROOT))
        placeholders = set(re.findall(r"\$\{([^}]*)\}", path.read_text()))
        substitutions = props["DefinitionSubstitutions"]
        assert placeholders == set(substitutions), name
        for key, (tag, value) in substitutions.items():
            function = value.split(".")[0]
            assert tag == "GetAtt" and key == f"{function}Arn", key
            assert resources[function]["Type"] == "AWS::Serverless::Function"
            invokable = [p["LambdaInvokePolicy"]["FunctionName"] for p in props["Policies"]]
            assert ("Ref", function) in invokable, f"{name} may not invoke {function}"


def test_every_function_has_its_handler():
    sys.path.insert(0, str(ROOT))
    from functions.migration.app import HANDLERS

    resources = _template()["Resources"]
    for name in HANDLERS:
        props = resources[f"{name}Function"]["Properties"]
        assert props["CodeUri"] == "functions/migration/"
        handler = props["Handler"].removeprefix("app.")
        assert HANDLERS[name].__name__ == handler


def test_every_task_retries_transient_errors_and_has_a_way_out():
    for path in MACHINES.values():
        states = json.loads(path.read_text())["States"]
        for name, state in states.items():
            for target in [state.get("Next"), state.get("Default")] + [
                c.get("Next") for c in state.get("Choices", []) + state.get("Catch", [])
            ]:
                assert target is None or target in states, f"{name} -> {target}"
            if state["Type"] != "Task":
                continue
            assert "TransientError" in state["Retry"][0]["ErrorEquals"], name
            if path.name == "migration.asl.json":
                assert any("States.ALL" in c["ErrorEquals"] for c in state.get("Catch", [])), name


def test_json_path_only():
    """moto runs JSONPath, and so does the workflow: JSONata would pass locally only as a stub."""
    for path in MACHINES.values():
        assert "JSONata" not in path.read_text()


def test_the_template_reference_names_every_parameter_resource_and_output():
    """docs/template.md is the deploy's reference: nothing in template.yaml goes undocumented."""
    template = _template()
    doc = (ROOT / "docs" / "template.md").read_text()
    missing = {
        section: [name for name in template[section] if f"`{name}`" not in doc]
        for section in ("Parameters", "Resources", "Outputs")
    }
    assert missing == {"Parameters": [], "Resources": [], "Outputs": []}
