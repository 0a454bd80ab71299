"""Run real ASL state machines in this process's moto server, with Lambda tasks calling our handlers.

moto (5.2.x) interprets the ASL file itself (its port of LocalStack's interpreter); no part of a workflow
is re-implemented here. `LocalStepFunctions.install()` turns that interpreter on and patches four seams:

- `moto.core.config.default_user_config`: `stepfunctions.execute_state_machine = True` and
  `lambda.use_docker = False`, the dict that `POST /moto-api/config` sets (one process: set directly).
  While installed, every Lambda call to this moto server goes to the Docker-free backend.
- `moto.awslambda_simple.models.LambdaSimpleBackend.invoke`: dispatches to `handlers[function name]` (from
  a name, `name:qualifier` or an ARN) with a `LocalLambdaContext`. A handler that raises answers as Lambda
  does: `X-Amz-Function-Error: Unhandled` and `{"errorMessage", "errorType": <class name>, "requestId",
  "stackTrace"}`; a result that is not JSON is `Runtime.MarshalError`; a name without a handler is Lambda's
  404 `ResourceNotFoundException`.
- `WaitFunction._wait_interval` (Wait states: Seconds, SecondsPath, Timestamp, TimestampPath) and the
  `time.sleep` of `retrier_decl` (Retry back-off) sleep `seconds * wait_scale`, capped at `max_wait_seconds`.
  A Wait still wakes on StopExecution.
- `boto_client.moto_server_port`: the interpreter's own boto3 clients call `http://localhost:$MOTO_PORT`
  (default 5000), not AWS_ENDPOINT_URL; the port now comes from AWS_ENDPOINT_URL.

Handlers run on moto's server threads, several at once under Map/Parallel or concurrent executions. Wait
for executions to end before `uninstall()`: afterwards their Lambda tasks get moto's echo.

Matching Lambda errors in Retry/Catch (tests/integration/test_local_stepfunctions.py): for a plain function
ARN `Resource` and for `arn:aws:states:::lambda:invoke` alike, the error name is the exception's class name,
unqualified (`"ErrorEquals": ["TransientError"]`, no module, no `Lambda.` prefix); `States.TaskFailed` and
`States.ALL` match too. A Catch's `ResultPath` gets `{"Error": <class name>, "Cause": <the error payload
above, as a JSON string>}`; uncaught, the same pair is the execution's error/cause. Only Lambda's own
(service) errors differ: a missing function is `Lambda.ResourceNotFoundException` under `lambda:invoke`,
`Exception` under a plain ARN. History: `LambdaFunctionFailed` events (ARN) vs `TaskFailed` (`lambda:invoke`).
A `lambda:invoke` result is `{"StatusCode": 200, "Payload": <handler result>}`: select with
`"OutputPath": "$.Payload"` or `ResultSelector` on `$.Payload...`; a plain ARN's result is the payload.

What moto 5.2.5's executor runs (JSONPath), tried here:
- works: Choice with Numeric*/String*/Boolean* comparisons (and their *Path forms), StringMatches,
  IsPresent, And/Or/Not, Default; Wait with Seconds/SecondsPath/Timestamp/TimestampPath; Pass with
  Parameters/Result/ResultPath; Task InputPath/Parameters/ResultSelector/ResultPath/OutputPath; intrinsics
  States.Format, MathAdd, ArrayLength, Array, ArrayPartition, ArrayContains, ArrayRange, StringSplit,
  StringToJson, JsonToString, Hash, Base64Encode, UUID; Retry (IntervalSeconds, BackoffRate, MaxAttempts,
  MaxDelaySeconds, JitterStrategy) and Catch; Map (inline ItemProcessor/ItemSelector/MaxConcurrency and the
  legacy Iterator/Parameters) and Parallel; Fail with Error/Cause and ErrorPath/CausePath; the `$$` context
  (`$$.Execution.Id`, `$$.Map.Item.Value/Index`, `$$.Task.Token`); Task TimeoutSeconds (`States.Timeout`).
- `.waitForTaskToken` works: `"Resource": "arn:aws:states:::lambda:invoke.waitForTaskToken"` with
  `"Payload": {"token.$": "$$.Task.Token", ...}`; the handler's return value is ignored, and someone (the
  handler, a thread of the test) calls `boto3.client("stepfunctions").send_task_success(taskToken=token,
  output=json.dumps(result))`; the task's result is that output. `send_task_failure(taskToken, error,
  cause)` fails the task with `error` (Catch on it works) but moto drops `cause` (Cause is null).
- does not work: JSONata (`"QueryLanguage": "JSONata"` fails with States.Runtime: its evaluator is a stub);
  `lambda:invoke.sync` (States.Runtime "Unsupported sync callback procedure"; not in AWS either);
  StopExecution's error/cause (the result is ABORTED with neither). Not fast-forwarded: a Task's
  TimeoutSeconds and a callback's HeartbeatSeconds run in real time. Untried: Distributed Map/ItemReader.
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
import traceback
import uuid
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from embedsvc.local.lambda_context import LocalLambdaContext

Handler = Callable[[Any, Any], Any]

_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")
_ROLE_NAME = "embedsvc-local-stepfunctions"
_lock = threading.RLock()
_installed: LocalStepFunctions | None = None
_originals: dict[str, Any] = {}


@dataclass
class ExecutionResult:
    """How an execution ended: status, parsed output, error/cause, and the states entered in order."""

    execution_arn: str
    status: str
    output: Any = None
    error: str | None = None
    cause: str | None = None
    states_entered: list[str] = field(default_factory=list)


class _ScaledTime:
    """Stands in for the `time` module inside moto's retrier so that only its back-off sleep is scaled."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        owner = _installed
        time.sleep(owner._scaled(seconds) if owner is not None else seconds)


def _function_name(name_or_arn: str) -> str:
    """`fn`, `fn:alias`, `arn:aws:lambda:region:account:function:fn[:alias]` -> `fn`."""
    if name_or_arn.startswith("arn:"):
        return name_or_arn.split(":")[6]
    return name_or_arn.split(":")[0]


def _endpoint_port() -> str:
    """The port of the moto server in AWS_ENDPOINT_URL, where moto's interpreter must send its calls."""
    url = os.environ.get("AWS_ENDPOINT_URL")
    port = urlparse(url).port if url else None
    return str(port) if port else (os.environ.get("MOTO_PORT") or "5000")


def _unknown_function(backend: Any, name_or_arn: str) -> Exception:
    """Lambda's ResourceNotFoundException, with the request id that moto's interpreter reads from errors."""
    from moto.awslambda.exceptions import UnknownFunctionException

    class FunctionNotFound(UnknownFunctionException):
        def get_headers(self, *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
            return [*super().get_headers(*args, **kwargs), ("x-amzn-RequestId", str(uuid.uuid4()))]

    arn = name_or_arn
    if not arn.startswith("arn:"):
        arn = f"arn:aws:lambda:{backend.region_name}:{backend.account_id}:function:{name_or_arn}"
    return FunctionNotFound(arn)


def _dummy_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("app.py", "def lambda_handler(event, context):\n    return event\n")
    return buffer.getvalue()


class LocalStepFunctions:
    """Runs ASL state machines in the moto server of this process; Lambda tasks call our handlers."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        wait_scale: float = 0.0,
        max_wait_seconds: float | None = None,
    ):
        if wait_scale < 0:
            raise ValueError("wait_scale must be >= 0")
        self.handlers: dict[str, Handler] = dict(handlers)
        self.wait_scale = wait_scale
        self.max_wait_seconds = max_wait_seconds
        self._clients: dict[str, Any] = {}
        self._function_arns: dict[str, str] = {}
        self._role_arn: str | None = None

    def __enter__(self) -> LocalStepFunctions:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _scaled(self, seconds: float) -> float:
        scaled = max(0.0, float(seconds)) * self.wait_scale
        return scaled if self.max_wait_seconds is None else min(scaled, self.max_wait_seconds)

    def install(self) -> LocalStepFunctions:
        """Turn on moto's ASL interpreter and route Lambda invokes and waits through this object; idempotent."""
        global _installed
        with _lock:
            if _installed is self:
                return self
            if _installed is not None:
                raise RuntimeError("another LocalStepFunctions is installed; uninstall it first")
            _patch()
            _installed = self
        return self

    def uninstall(self) -> None:
        """Undo every patch and restore moto's config; a no-op when this object is not installed."""
        global _installed
        with _lock:
            if _installed is not self:
                return
            _unpatch()
            _installed = None
        self._clients.clear()

    def _client(self, service: str) -> Any:
        if _installed is not self:
            raise RuntimeError("call LocalStepFunctions.install() first")
        with _lock:
            if service not in self._clients:
                import boto3

                # Not the package's process-wide cached client: this one reads AWS_ENDPOINT_URL now, so
                # it talks to the moto server that is up while this object is installed.
                self._clients[service] = boto3.session.Session().client(
                    service,
                    region_name=os.environ.get("AWS_REGION")
                    or os.environ.get("AWS_DEFAULT_REGION")
                    or "us-east-1",
                )
            return self._clients[service]

    def _role(self) -> str:
        if self._role_arn is None:
            iam = self._client("iam")
            try:
                self._role_arn = iam.get_role(RoleName=_ROLE_NAME)["Role"]["Arn"]
            except iam.exceptions.NoSuchEntityException:
                trust = {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Service": ["lambda.amazonaws.com", "states.amazonaws.com"]},
                            "Action": "sts:AssumeRole",
                        }
                    ],
                }
                self._role_arn = iam.create_role(
                    RoleName=_ROLE_NAME, AssumeRolePolicyDocument=json.dumps(trust)
                )["Role"]["Arn"]
        return self._role_arn

    def function_arn(self, name: str) -> str:
        """The ARN of the moto Lambda function `name`, created (dummy code and role) on first use."""
        if name not in self._function_arns:
            lam = self._client("lambda")
            try:
                arn = lam.get_function(FunctionName=name)["Configuration"]["FunctionArn"]
            except lam.exceptions.ResourceNotFoundException:
                arn = lam.create_function(
                    FunctionName=name,
                    Runtime="python3.11",
                    Role=self._role(),
                    Handler="app.lambda_handler",
                    Code={"ZipFile": _dummy_zip()},
                    Timeout=900,
                )["FunctionArn"]
            self._function_arns[name] = arn
        return self._function_arns[name]

    def create_state_machine(
        self, name: str, definition_path: str | Path, substitutions: Mapping[str, str]
    ) -> str:
        """Create (or update) the state machine from an ASL file with SAM `${Key}` substitutions; its ARN."""
        text = Path(definition_path).read_text()
        unknown = sorted({key for key in _PLACEHOLDER.findall(text) if key not in substitutions})
        if unknown:
            raise ValueError(f"{definition_path}: no substitution for {', '.join(unknown)}")
        definition = _PLACEHOLDER.sub(lambda match: str(substitutions[match.group(1)]), text)
        sfn = self._client("stepfunctions")
        for page in sfn.get_paginator("list_state_machines").paginate():
            for machine in page["stateMachines"]:
                if machine["name"] == name:
                    sfn.update_state_machine(
                        stateMachineArn=machine["stateMachineArn"], definition=definition
                    )
                    return str(machine["stateMachineArn"])
        return str(
            sfn.create_state_machine(name=name, definition=definition, roleArn=self._role())[
                "stateMachineArn"
            ]
        )

    def start(self, state_machine_arn: str, payload: dict, name: str | None = None) -> str:
        """Start an execution with `payload` as input; its ARN."""
        answer = self._client("stepfunctions").start_execution(
            stateMachineArn=state_machine_arn, name=name or uuid.uuid4().hex, input=json.dumps(payload)
        )
        return str(answer["executionArn"])

    def wait(self, execution_arn: str, timeout: float = 300) -> ExecutionResult:
        """Poll until the execution leaves RUNNING (TimeoutError after `timeout` seconds)."""
        sfn = self._client("stepfunctions")
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            described = sfn.describe_execution(executionArn=execution_arn)
            if described["status"] != "RUNNING":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{execution_arn} still RUNNING after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        output = described.get("output")
        return ExecutionResult(
            execution_arn=execution_arn,
            status=described["status"],
            output=json.loads(output) if output is not None else None,
            error=described.get("error"),
            cause=described.get("cause"),
            states_entered=[
                event["stateEnteredEventDetails"]["name"]
                for event in self.history(execution_arn)
                if "stateEnteredEventDetails" in event
            ],
        )

    def history(self, execution_arn: str) -> list[dict]:
        """Every history event of the execution, oldest first."""
        sfn = self._client("stepfunctions")
        events: list[dict] = []
        kwargs: dict[str, Any] = {"executionArn": execution_arn}
        while True:
            page = sfn.get_execution_history(**kwargs)
            events.extend(page["events"])
            if not page.get("nextToken"):
                return events
            kwargs["nextToken"] = page["nextToken"]

    def _invoke(self, backend: Any, function_name: str, body: Any, response_headers: dict) -> bytes:
        name = _function_name(function_name)
        handler = self.handlers.get(name)
        if handler is None:
            raise _unknown_function(backend, function_name)
        if isinstance(body, bytes):
            body = body.decode("utf-8")
        event = json.loads(body) if body else {}
        context = LocalLambdaContext(function_name=name)
        try:
            result = handler(event, context)
        except Exception as exc:  # a Lambda function error, not ours: report it as Lambda does
            response_headers["x-amz-function-error"] = "Unhandled"
            frames = exc.__traceback__.tb_next if exc.__traceback__ else None  # from the handler down
            return json.dumps(
                {
                    "errorMessage": str(exc),
                    "errorType": type(exc).__name__,
                    "requestId": context.aws_request_id,
                    "stackTrace": traceback.format_tb(frames),
                }
            ).encode("utf-8")
        try:
            return json.dumps(result).encode("utf-8")
        except (TypeError, ValueError) as exc:  # Lambda's answer to a result it cannot serialize
            response_headers["x-amz-function-error"] = "Unhandled"
            return json.dumps(
                {"errorMessage": f"Unable to marshal response: {exc}", "errorType": "Runtime.MarshalError"}
            ).encode("utf-8")


def _patch() -> None:
    from moto.awslambda_simple.models import LambdaSimpleBackend
    from moto.core.config import default_user_config
    from moto.stepfunctions.parser.asl.component.common.retry import retrier_decl
    from moto.stepfunctions.parser.asl.component.state.wait.wait_function.wait_function import WaitFunction
    from moto.stepfunctions.parser.asl.utils import boto_client

    _originals.update(
        sfn_config=default_user_config["stepfunctions"],
        lambda_config=default_user_config["lambda"],
        invoke=LambdaSimpleBackend.__dict__["invoke"],
        wait_interval=WaitFunction.__dict__["_wait_interval"],
        retrier_time=retrier_decl.time,
        server_port=boto_client.moto_server_port,
    )
    default_user_config["stepfunctions"] = {"execute_state_machine": True}
    default_user_config["lambda"] = {"use_docker": False}

    def invoke(
        self: Any, function_name: str, qualifier: str | None, body: Any, headers: Any, response_headers: Any
    ) -> bytes | str | None:
        owner = _installed
        if owner is None:
            return _originals["invoke"](self, function_name, qualifier, body, headers, response_headers)  # type: ignore[no-any-return]
        return owner._invoke(self, function_name, body, response_headers)

    def wait_interval(self: Any, env: Any, wait_seconds: int) -> None:
        owner = _installed
        if owner is None:
            return _originals["wait_interval"](self, env, wait_seconds)  # type: ignore[no-any-return]
        seconds = owner._scaled(wait_seconds)
        if seconds > 0:
            env.program_state_event.wait(seconds)  # set by StopExecution, as in moto's own wait

    LambdaSimpleBackend.invoke = invoke  # type: ignore[method-assign]
    WaitFunction._wait_interval = wait_interval  # type: ignore[method-assign]
    retrier_decl.time = _ScaledTime()  # type: ignore[assignment]
    boto_client.moto_server_port = _endpoint_port


def _unpatch() -> None:
    from moto.awslambda_simple.models import LambdaSimpleBackend
    from moto.core.config import default_user_config
    from moto.stepfunctions.parser.asl.component.common.retry import retrier_decl
    from moto.stepfunctions.parser.asl.component.state.wait.wait_function.wait_function import WaitFunction
    from moto.stepfunctions.parser.asl.utils import boto_client

    default_user_config["stepfunctions"] = _originals["sfn_config"]
    default_user_config["lambda"] = _originals["lambda_config"]
    LambdaSimpleBackend.invoke = _originals["invoke"]  # type: ignore[method-assign]
    WaitFunction._wait_interval = _originals["wait_interval"]  # type: ignore[method-assign]
    retrier_decl.time = _originals["retrier_time"]  # type: ignore[assignment]
    boto_client.moto_server_port = _originals["server_port"]
    _originals.clear()


__all__ = ["ExecutionResult", "LocalStepFunctions"]
