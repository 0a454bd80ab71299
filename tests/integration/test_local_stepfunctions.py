"""Real ASL run by moto's interpreter, with its Lambda tasks dispatched in process to Python handlers."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import pytest

from embedsvc.local.stack import LocalStack
from embedsvc.local.stepfunctions import LocalStepFunctions

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "stepfunctions" / "lambda_tasks.asl.json"
HAPPY_PATH = [
    "CountByArn",
    "WaitAnHour",
    "CountedEnough",
    "CountByInvoke",
    "WaitAnHour",
    "CountedEnough",
    "CountByInvoke",
    "WaitAnHour",
    "CountedEnough",
    "FlakyByArn",
    "FlakyByInvoke",
    "PermanentByArn",
    "FallbackArn",
    "PermanentByInvoke",
    "FallbackInvoke",
    "FailOnRequest",
]
# Three Waits of an hour each: an execution that ends within this many seconds was fast-forwarded.
FAST_FORWARDED = 30


class TransientError(Exception):
    pass


class PermanentError(Exception):
    pass


class Handlers:
    """The Lambda handlers of the fixture workflow; they record their calls (from moto's server threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.contexts: list[tuple[str, str, int]] = []

    def _record(self, key: str, context) -> int:
        with self._lock:
            self.calls[key] += 1
            self.contexts.append(
                (context.function_name, context.aws_request_id, context.get_remaining_time_in_millis())
            )
            return self.calls[key]

    def counter(self, event, context):
        self._record("counter", context)
        return {**event, "count": event["count"] + 1}

    def flaky(self, event, context):
        attempt = self._record(f"flaky:{event['key']}", context)
        if attempt < 3:
            raise TransientError(f"attempt {attempt} hit a rate limit")
        return {"attempts": attempt}

    def permanent(self, event, context):
        self._record("permanent", context)
        raise PermanentError("model retired")

    def mapping(self) -> dict:
        return {"counter": self.counter, "flaky": self.flaky, "permanent": self.permanent}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with LocalStack(
        tmp_path_factory.mktemp("sfn"), serve_api=False, content_store=False, qdrant_in_memory=True
    ) as local:
        yield local


@pytest.fixture
def handlers() -> Handlers:
    return Handlers()


@pytest.fixture
def sfn(stack, handlers):
    local = LocalStepFunctions(handlers.mapping()).install()
    yield local
    local.uninstall()


def substitutions(sfn: LocalStepFunctions, stage: str = "test") -> dict[str, str]:
    return {
        "CounterFunctionArn": sfn.function_arn("counter"),
        "FlakyFunctionArn": sfn.function_arn("flaky"),
        "PermanentFunctionArn": sfn.function_arn("permanent"),
        "Stage": stage,
    }


@pytest.fixture
def machine(sfn) -> str:
    return sfn.create_state_machine("lambda-tasks", FIXTURE, substitutions(sfn))


def test_choice_loops_on_lambda_results_through_hour_long_waits(sfn, machine, handlers):
    # Given a workflow whose counter loop waits an hour per turn, alternating the two resource styles
    # When it runs with wait_scale 0
    result = sfn.wait(sfn.start(machine, {"count": 0}), timeout=FAST_FORWARDED)
    # Then the Choice looped three times on the handler's answers and the execution succeeded
    assert result.status == "SUCCEEDED", (result.error, result.cause)
    assert result.output["count"] == 3
    assert result.states_entered == [*HAPPY_PATH, "Done"]
    assert handlers.calls["counter"] == 3
    counter_contexts = [ctx for ctx in handlers.contexts if ctx[0] == "counter"]
    assert len({request_id for _, request_id, _ in counter_contexts}) == 3
    assert all(remaining > 0 for _, _, remaining in counter_contexts)


def test_retry_matches_the_exception_class_name_in_both_resource_styles(sfn, machine, handlers):
    # Given a handler that raises TransientError twice, then answers
    result = sfn.wait(sfn.start(machine, {"count": 3}), timeout=FAST_FORWARDED)
    # Then Retry on ["TransientError"] ran it three times, for the function ARN and for lambda:invoke
    assert result.status == "SUCCEEDED", (result.error, result.cause)
    assert handlers.calls["flaky:arn"] == 3
    assert handlers.calls["flaky:invoke"] == 3
    assert result.output["flaky_arn"] == {"attempts": 3}
    assert result.output["flaky_invoke"] == {"attempts": 3}
    failures = [
        e for e in sfn.history(result.execution_arn) if e["type"] in {"LambdaFunctionFailed", "TaskFailed"}
    ]
    transient = [e for e in failures if "TransientError" in json.dumps(e, default=str)]
    assert len(transient) == 4


def test_catch_routes_a_permanent_error_to_the_fallback_state(sfn, machine, handlers):
    # Given a handler that raises PermanentError, behind a Retry for TransientError and a Catch for PermanentError
    result = sfn.wait(sfn.start(machine, {"count": 3}), timeout=FAST_FORWARDED)
    # Then the Retry did not match (one call per style) and the Catch passed Error and Cause on
    assert result.status == "SUCCEEDED", (result.error, result.cause)
    assert handlers.calls["permanent"] == 2
    for key in ("caught_arn", "caught_invoke"):
        caught = result.output[key]
        assert caught["Error"] == "PermanentError"
        cause = json.loads(caught["Cause"])
        assert cause["errorType"] == "PermanentError"
        assert cause["errorMessage"] == "model retired"
    assert result.output["fallback"] == {"stage": "test", "message": "fell back after PermanentError"}
    assert "FallbackArn" in result.states_entered
    assert "FallbackInvoke" in result.states_entered


@pytest.mark.parametrize("style", ["arn", "invoke"])
def test_an_uncaught_handler_error_fails_the_execution_with_error_and_cause(sfn, machine, style):
    # Given an input that routes to a Task without Catch whose handler raises PermanentError
    result = sfn.wait(sfn.start(machine, {"count": 3, "fail": style}), timeout=FAST_FORWARDED)
    # Then the execution FAILED with the exception's class name and Lambda's error payload
    assert result.status == "FAILED"
    assert result.output is None
    assert result.error == "PermanentError"
    assert json.loads(result.cause or "{}")["errorMessage"] == "model retired"
    assert result.states_entered[-1] == ("UncaughtByArn" if style == "arn" else "UncaughtByInvoke")


def test_placeholders_are_substituted_and_an_existing_machine_is_updated(sfn, machine, stack):
    # Given the machine created from the fixture's ${...} placeholders
    import boto3

    definition = boto3.client("stepfunctions").describe_state_machine(stateMachineArn=machine)["definition"]
    assert "${" not in definition
    assert sfn.function_arn("counter") in definition
    # When it is created again under the same name with another Stage
    again = sfn.create_state_machine("lambda-tasks", FIXTURE, substitutions(sfn, stage="canary"))
    # Then the same machine runs the new definition
    assert again == machine
    result = sfn.wait(sfn.start(machine, {"count": 3}), timeout=FAST_FORWARDED)
    assert result.output["fallback"]["stage"] == "canary"


def test_an_unknown_placeholder_is_a_value_error_naming_it(sfn):
    values = substitutions(sfn)
    del values["Stage"]
    with pytest.raises(ValueError, match="Stage"):
        sfn.create_state_machine("lambda-tasks-missing", FIXTURE, values)


@pytest.mark.parametrize(
    ("resource", "error"),
    [
        ("arn:aws:states:::lambda:invoke", "Lambda.ResourceNotFoundException"),
        ("arn:aws:lambda:us-east-1:123456789012:function:no-such-handler", "Exception"),
    ],
)
def test_a_function_without_a_handler_fails_as_lambda_does(sfn, tmp_path, resource, error):
    state: dict = {"Type": "Task", "Resource": resource, "End": True}
    if resource.startswith("arn:aws:states"):
        state["Parameters"] = {"FunctionName": "no-such-handler", "Payload": {}}
    path = tmp_path / "missing.asl.json"
    path.write_text(json.dumps({"StartAt": "Call", "States": {"Call": state}}))
    arn = sfn.create_state_machine("missing-handler", path, {})
    result = sfn.wait(sfn.start(arn, {}), timeout=FAST_FORWARDED)
    assert result.status == "FAILED"
    assert result.error == error
    assert "no-such-handler" in (result.cause or "")


def test_max_wait_seconds_caps_a_real_time_wait(stack, tmp_path):
    # Given real-time waits (wait_scale 1) capped at a hundredth of a second
    path = tmp_path / "wait.asl.json"
    path.write_text(
        json.dumps(
            {
                "StartAt": "Sleep",
                "States": {"Sleep": {"Type": "Wait", "SecondsPath": "$.seconds", "End": True}},
            }
        )
    )
    with LocalStepFunctions({}, wait_scale=1.0, max_wait_seconds=0.01) as sfn:
        arn = sfn.create_state_machine("capped-wait", path, {})
        # When a Wait asks for an hour; Then it ends long before
        result = sfn.wait(sfn.start(arn, {"seconds": 3600}), timeout=FAST_FORWARDED)
    assert result.status == "SUCCEEDED"
    assert result.states_entered == ["Sleep"]


def test_install_is_idempotent_exclusive_and_undone_by_uninstall(stack):
    from moto.awslambda_simple.models import LambdaSimpleBackend
    from moto.core.config import default_user_config
    from moto.stepfunctions.parser.asl.component.state.wait.wait_function.wait_function import WaitFunction

    before = (dict(default_user_config["stepfunctions"]), dict(default_user_config["lambda"]))
    invoke, wait_interval = LambdaSimpleBackend.invoke, WaitFunction._wait_interval
    first = LocalStepFunctions({})
    assert first.install() is first.install()
    assert default_user_config["stepfunctions"] == {"execute_state_machine": True}
    assert LambdaSimpleBackend.invoke is not invoke
    with pytest.raises(RuntimeError):
        LocalStepFunctions({}).install()
    first.uninstall()
    first.uninstall()
    assert (dict(default_user_config["stepfunctions"]), dict(default_user_config["lambda"])) == before
    assert LambdaSimpleBackend.invoke is invoke
    assert WaitFunction._wait_interval is wait_interval
