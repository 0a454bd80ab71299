"""The dashboard, saved queries and alarms in template.yaml name only metrics the code really emits.

The template is parsed with its CloudFormation tags kept, the dashboard's `!Sub` body is resolved (every
`${...}` must name a parameter, a pseudo parameter or a resource of the template) and parsed as JSON,
and each metric of our namespace it or an alarm names is looked up among the names the package's source
emits: CostRecorder's metrics, OpsMetrics.count / the ledger's _emit calls, the consistency jobs'
emit_metrics records and the evaluation's constants. AWS/* namespaces are exempt. A metric renamed in
the code, or a widget with a typo, fails here instead of drawing an empty graph.
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "layers" / "embedsvc" / "embedsvc"
NAMESPACE = "EmbeddingService"
PSEUDO = {
    "AWS::Region": "us-east-1",
    "AWS::StackName": "embedsvc-test",
    "AWS::AccountId": "123456789012",
    "AWS::Partition": "aws",
    "AWS::URLSuffix": "amazonaws.com",
}
_IDENTIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class _Loader(yaml.SafeLoader):
    """Keeps CloudFormation's short tags as their long form ({"Fn::Sub": ...}, {"Ref": ...})."""


def _tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict:
    if isinstance(node, yaml.ScalarNode):
        value: object = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {"Ref" if suffix == "Ref" else f"Fn::{suffix}": value}


_Loader.add_multi_constructor("!", _tag)


def template() -> dict:
    return yaml.load((ROOT / "template.yaml").read_text(), Loader=_Loader)


def resolve_sub(text: str, doc: dict) -> str:
    """A `!Sub` string with parameters at their defaults, resources and attributes as placeholder names."""
    parameters = doc.get("Parameters", {})
    resources = doc["Resources"]

    def value(match: re.Match) -> str:
        name = match.group(1)
        if name.startswith("!"):
            return "${" + name[1:] + "}"  # ${!Literal} stays literal
        if name in PSEUDO:
            return PSEUDO[name]
        if name in parameters:
            default = parameters[name].get("Default")
            assert default is not None, f"${{{name}}} has no default to resolve the body with"
            return str(default)
        resource = name.split(".", 1)[0]
        assert resource in resources, f"${{{name}}} names no parameter or resource of the template"
        return f"{name.replace('.', '-').lower()}-resolved"

    return re.sub(r"\$\{([^}]+)\}", value, text)


def dashboard(doc: dict) -> dict:
    (body,) = [
        r["Properties"]["DashboardBody"]
        for r in doc["Resources"].values()
        if r["Type"] == "AWS::CloudWatch::Dashboard"
    ]
    assert set(body) == {"Fn::Sub"}, "the body is one !Sub string"
    return json.loads(resolve_sub(body["Fn::Sub"], doc))


def dashboard_metrics(body: dict) -> set[tuple[str, str, tuple[str, ...] | None]]:
    """(namespace, metric, dimension names or None when not stated) of every metric the widgets draw."""
    found: set[tuple[str, str, tuple[str, ...] | None]] = set()
    search = re.compile(r"SEARCH\(\s*'\{([^}]*)\}[^']*?MetricName=\"(\w+)\"")
    for widget in body["widgets"]:
        if widget["type"] != "metric":
            continue
        previous: list = []
        for row in widget["properties"]["metrics"]:
            if isinstance(row[0], dict):
                for schema, name in search.findall(row[0].get("expression", "")):
                    namespace, *dimensions = [part.strip() for part in schema.split(",")]
                    found.add((namespace, name, tuple(sorted(dimensions))))
                continue
            parts = [p for p in row if not isinstance(p, dict)]
            parts = [previous[i] if p == "." else p for i, p in enumerate(parts)]
            previous = parts
            namespace, name, *pairs = parts
            found.add((namespace, name, tuple(sorted(pairs[0::2]))))
    return found


def alarm_metrics(doc: dict) -> set[tuple[str, str, tuple[str, ...] | None]]:
    found: set[tuple[str, str, tuple[str, ...] | None]] = set()
    for resource in doc["Resources"].values():
        if resource["Type"] != "AWS::CloudWatch::Alarm":
            continue
        props = resource["Properties"]
        metrics = [props] if "MetricName" in props else []
        metrics += [m["MetricStat"]["Metric"] for m in props.get("Metrics", []) if "MetricStat" in m]
        for metric in metrics:
            dims = tuple(sorted(d["Name"] for d in metric.get("Dimensions", [])))
            found.add((metric["Namespace"], metric["MetricName"], dims))
    return found


def emitted_metrics() -> dict[str, set[tuple[str, ...]] | None]:
    """Metric name -> the dimension sets the code emits it with (None where the source does not say)."""
    trees = {path: ast.parse(path.read_text()) for path in PACKAGE.rglob("*.py")}
    constants: dict[str, object] = {}
    for tree in trees.values():
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
            ):
                with contextlib.suppress(ValueError):
                    constants[node.targets[0].id] = ast.literal_eval(node.value)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
                with contextlib.suppress(ValueError):
                    constants[node.target.id] = ast.literal_eval(node.value)
    dimension_sets: dict[str, set[tuple[str, ...]]] = {}
    unstated: set[str] = set()  # emitted somewhere whose dimensions the source does not state

    def add(name: object, dimensions: tuple[str, ...] | None = None, *, declared: bool = False) -> None:
        """A metric name; with the dimensions its call site states, or unstated (unless only declared)."""
        if not isinstance(name, str) or not _IDENTIFIER.match(name):
            return
        known = dimension_sets.setdefault(name, set())
        if dimensions is not None:
            known.add(tuple(sorted(dimensions)))
        elif not declared:
            unstated.add(name)

    def literal(node: ast.expr) -> object:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return constants.get(node.id)
        return None

    # Constants that name metrics: LEDGER_ERRORS_METRIC = "...", GATE_METRICS = (...), COST_METRIC_NAMES.
    for constant, value in constants.items():
        if constant.endswith("_METRIC") and isinstance(value, str):
            add(value, declared=True)  # its call sites say with which dimensions
        elif constant.endswith(("_METRICS", "_METRIC_NAMES")) and isinstance(value, tuple | list):
            for item in value:
                add(item)
    for tree in trees.values():
        for node in ast.walk(tree):
            # OpsMetrics.count(name, value, **dimensions), the ledger's _emit, Powertools' add_metric.
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("count", "_emit", "add_metric")
                and node.args
            ):
                dims = tuple(k.arg for k in node.keywords if k.arg and k.arg != "value")
                has_splat = any(k.arg is None for k in node.keywords)
                add(literal(node.args[0]), None if has_splat or node.func.attr == "add_metric" else dims)
            # emit_metrics' {name: (value, unit)} records (consistency, repair, costs).
            if (
                isinstance(node, ast.Dict)
                and node.values
                and all(
                    isinstance(v, ast.Tuple) and len(v.elts) == 2 and isinstance(v.elts[1], ast.Constant)
                    for v in node.values
                )
            ):
                for key in node.keys:
                    if key is not None:
                        add(literal(key))
            # A function that calls emit_metrics: the string keys of its dicts are metric names, except
            # those of the dicts it passes as the record's dimensions.
            if isinstance(node, ast.FunctionDef):
                calls = [
                    n
                    for n in ast.walk(node)
                    if isinstance(n, ast.Call)
                    and isinstance(n.func, ast.Name)
                    and n.func.id == "emit_metrics"
                ]
                dimension_args = {
                    id(arg)
                    for call in calls
                    for arg in [*call.args[2:3], *(k.value for k in call.keywords if k.arg == "dimensions")]
                }
                for inner in ast.walk(node) if calls else ():
                    if isinstance(inner, ast.Dict) and id(inner) not in dimension_args:
                        for key in inner.keys:
                            if key is not None:
                                add(literal(key))
    # CostRecorder publishes every cost record under each of COST_DIMENSION_SETS.
    cost_sets = constants.get("COST_DIMENSION_SETS")
    if isinstance(cost_sets, tuple):
        for name in constants.get("COST_METRIC_NAMES") or ():
            dimension_sets[name] = {tuple(sorted(dims)) for dims in cost_sets}
            unstated.discard(name)
    return {name: None if name in unstated or not sets else sets for name, sets in dimension_sets.items()}


def check(named: set[tuple[str, str, tuple[str, ...] | None]], where: str) -> None:
    emitted = emitted_metrics()
    ours = {(name, dims) for namespace, name, dims in named if namespace == NAMESPACE}
    assert all(namespace == NAMESPACE or namespace.startswith("AWS/") for namespace, _, _ in named)
    unknown = sorted(name for name, _ in ours if name not in emitted)
    assert unknown == [], f"{where} names metrics the code never emits: {unknown}"
    wrong = sorted(
        (name, dims)
        for name, dims in ours
        if dims is not None and emitted[name] is not None and dims not in emitted[name]  # type: ignore[operator]
    )
    assert wrong == [], f"{where} asks for dimension sets the code does not emit: {wrong}"


def test_the_scan_finds_the_metrics_each_part_of_the_code_emits():
    emitted = emitted_metrics()
    for name in (
        "Tokens",
        "CostUSD",
        "LedgerErrors",
        "LedgerUtilization",
        "BudgetRefused",
        "ConsistencyOldestGapSeconds",
        "RepairErrors",
        "EvaluationRegression",
        "ndcg_at_10",
    ):
        assert name in emitted, name
    assert emitted["BudgetRefused"] == {("scope",)}
    assert emitted["LedgerUtilization"] == {("lane",)}
    assert emitted["CostUSD"] == {("model", "source"), ("source",)}
    assert "Collection" not in emitted and "ContentType" not in emitted  # dimensions, not metrics


def test_the_dashboard_body_is_json_with_widgets_on_the_grid():
    body = dashboard(template())
    assert body["widgets"]
    for widget in body["widgets"]:
        assert widget["x"] >= 0 and widget["x"] + widget["width"] <= 24, widget["properties"].get("title")
        if widget["type"] == "log":
            assert widget["properties"]["query"].startswith("SOURCE '")


def test_every_metric_of_ours_on_the_dashboard_is_emitted_by_the_code():
    named = dashboard_metrics(dashboard(template()))
    for wanted in (
        "CostUSD",
        "SavedUSD",
        "LedgerUtilization",
        "BudgetRefused",
        "ConsistencyOldestGapSeconds",
    ):
        assert any(name == wanted for _, name, _ in named), f"the dashboard shows no {wanted}"
    check(named, "the dashboard")


def test_every_alarm_of_ours_watches_an_emitted_metric_and_notifies_the_one_topic():
    doc = template()
    check(alarm_metrics(doc), "an alarm")
    topics = [k for k, r in doc["Resources"].items() if r["Type"] == "AWS::SNS::Topic"]
    assert topics == ["AlarmTopic"]
    for name, resource in doc["Resources"].items():
        if resource["Type"] == "AWS::CloudWatch::Alarm":
            assert resource["Properties"]["AlarmActions"] == [{"Ref": "AlarmTopic"}], name
    subscription = doc["Resources"]["AlarmEmailSubscription"]
    assert subscription["Condition"] == "HasAlarmEmail"
    assert doc["Parameters"]["AlarmEmail"]["Default"] == ""


def test_reindex_spend_has_an_anomaly_band_alarm_on_its_source_dimension():
    props = template()["Resources"]["ReindexSpendAnomalyAlarm"]["Properties"]
    by_id = {m["Id"]: m for m in props["Metrics"]}
    band = by_id[props["ThresholdMetricId"]]
    assert band["Expression"].startswith("ANOMALY_DETECTION_BAND(spend")
    metric = by_id["spend"]["MetricStat"]["Metric"]
    assert metric["MetricName"] == "CostUSD"
    assert metric["Dimensions"] == [{"Name": "source", "Value": "reindex"}]


def test_the_saved_queries_read_the_cost_properties():
    doc = template()
    queries = {
        r["Properties"]["Name"]["Fn::Sub"]: r["Properties"]
        for r in doc["Resources"].values()
        if r["Type"] == "AWS::Logs::QueryDefinition"
    }
    names = {name.rsplit("/", 1)[-1] for name in queries}
    assert {"top-users-by-spend", "top-tasks-by-spend", "one-task-total", "cost-per-migration"} <= names
    for props in queries.values():
        assert "CostUSD" in props["QueryString"]
        for group in props["LogGroupNames"]:
            assert doc["Resources"][group["Ref"]]["Type"] == "AWS::Logs::LogGroup"
