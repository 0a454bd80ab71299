"""The embedded default: the whole service on one machine, with no AWS account and no Docker.

moto in server mode stands in for DynamoDB, SQS, SSM, Secrets Manager and CloudWatch; Qdrant runs in
local mode on disk; the local model embeds; a small HTTP server plays API Gateway and a poller plays
the SQS event source mapping. The real handlers run behind both.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[4]  # the repository: layers/embedsvc/embedsvc/local/stack.py -> root
DEFAULT_API_KEY = "sk-local-dev-key"


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def local_environment(moto_url: str, workdir: Path, *, qdrant_in_memory: bool = False) -> dict[str, str]:
    """The environment the handlers read, pointing every AWS client at the moto server."""
    return {
        "AWS_ENDPOINT_URL": moto_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "STAGE": "local",
        "CACHE_TABLE": "embedsvc-local-cache",
        "LEDGER_TABLE": "embedsvc-local-ratelimit",
        "API_KEYS_TABLE": "embedsvc-local-api-keys",
        "STATE_TABLE": "embedsvc-local-state",
        "COSTS_TABLE": "embedsvc-local-costs",
        "QDRANT_PATH": "" if qdrant_in_memory else str(workdir / "qdrant"),
        "POWERTOOLS_SERVICE_NAME": "embedsvc",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_LOG_LEVEL": os.environ.get("POWERTOOLS_LOG_LEVEL", "WARNING"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def bootstrap(api_key: str) -> dict[str, str]:
    """Create what template.yaml creates (tables, queues) and register the local API key."""
    from embedsvc import container
    from embedsvc.adapters.aws import client
    from embedsvc.adapters.cache import create_cache_table
    from embedsvc.adapters.cost_store import create_costs_table
    from embedsvc.adapters.dead_letters import create_state_table
    from embedsvc.services.auth import create_api_keys_table
    from embedsvc.services.ratelimit import create_ledger_table

    settings = container.settings()
    dynamodb, sqs = client("dynamodb"), client("sqs")
    create_cache_table(dynamodb, settings.cache_table)
    create_ledger_table(dynamodb, settings.ledger_table)
    create_api_keys_table(dynamodb, settings.api_keys_table)
    create_state_table(dynamodb, settings.state_table)
    create_costs_table(dynamodb, settings.costs_table)
    dlq_url = sqs.create_queue(QueueName="embedsvc-local-index-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    queue_url = sqs.create_queue(
        QueueName="embedsvc-local-index",
        Attributes={
            "VisibilityTimeout": "30",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "5"}),
        },
    )["QueueUrl"]
    container.api_keys().create(tenant_id="local", user_id="local-user", name="local", key=api_key)
    return {"INDEX_QUEUE_URL": queue_url, "INDEX_DLQ_URL": dlq_url}


class LocalStack:
    """`with LocalStack() as stack:` starts moto, creates the resources and points the package at them."""

    def __init__(
        self,
        workdir: Path | str = ROOT / ".local",
        *,
        api_key: str | None = None,
        port: int | None = None,
        serve_api: bool = True,
        run_poller: bool = False,
        qdrant_in_memory: bool = False,
        extra_env: dict[str, str] | None = None,
        content_store: bool = True,
        step_functions: bool = False,
        wait_scale: float = 0.0,
    ):
        self.workdir = Path(workdir)
        self.api_key = api_key or os.environ.get("LOCAL_API_KEY") or DEFAULT_API_KEY
        self.port = port
        self.serve_api = serve_api
        self.run_poller = run_poller
        self.qdrant_in_memory = qdrant_in_memory
        self.extra_env = extra_env or {}
        self.content_store = content_store
        # The migration workflow: statemachines/*.asl.json run by moto's executor, tasks in this process.
        self.step_functions = step_functions
        self.wait_scale = wait_scale  # real seconds per ASL Wait second (0: Wait states pass at once)
        self.sfn: Any = None
        self.database: Any = None  # the LocalDatabase behind DATABASE_URL (see local/postgres.py)
        self.gateway: Any = None
        self.poller: Any = None
        self._moto: Any = None
        self._saved_env: dict[str, str | None] = {}

    def _set_env(self, values: dict[str, str]) -> None:
        for key, value in values.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def start(self) -> LocalStack:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
        from embedsvc.local.moto_atomic import serialize_dynamodb_items

        serialize_dynamodb_items()  # the API and the worker share the ledger item from several threads

        from embedsvc.container import reset_settings

        self.workdir.mkdir(parents=True, exist_ok=True)
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))  # the handlers live in functions/, beside the layer
        moto_port = free_port()
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
        self._moto.start()
        # moto's backends are process-wide, not per server: a stack started after another in the same
        # process (tests) would inherit its tables, queues and parameters. Every stack starts empty.
        import urllib.request

        urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{moto_port}/moto-api/reset", method="POST"), timeout=30
        ).close()
        self._set_env(
            local_environment(
                f"http://127.0.0.1:{moto_port}", self.workdir, qdrant_in_memory=self.qdrant_in_memory
            )
        )
        self._set_env(self.extra_env)
        if self.content_store:
            self._start_database()
        reset_settings()
        self._set_env(bootstrap(self.api_key))
        if self.step_functions:
            self._set_env(self._start_step_functions())
        reset_settings()
        emf_log = self.workdir / "emf.jsonl"
        from embedsvc import container
        from embedsvc.observability import CostRecorder

        def to_file(blob: dict) -> None:
            with emf_log.open("a") as fh:
                fh.write(json.dumps(blob) + "\n")

        container.put(
            "costs",
            CostRecorder(
                namespace=container.settings().metrics_namespace, sink=to_file, store=container.cost_store
            ),
        )
        if self.serve_api:
            from embedsvc.local.gateway import LocalGateway
            from functions.api.app import lambda_handler as api_handler
            from functions.authorizer.app import lambda_handler as authorizer_handler

            self.gateway = LocalGateway(
                api_handler, authorizer_handler, port=self.port if self.port is not None else 0
            ).start()
        if self.run_poller:
            self.poller = self.make_poller().start()
        return self

    def _start_database(self) -> None:
        """DATABASE_URL if set; else a fresh database on 127.0.0.1:5432; else an embedded cluster. Migrated."""
        from embedsvc.adapters.postgres import Database
        from embedsvc.db.migrations import upgrade
        from embedsvc.local.postgres import resolve_local_database

        self.database = resolve_local_database(self.workdir)
        db = Database.from_url(self.database.url)
        try:
            upgrade(db)
        finally:
            db.close()
        self._set_env({"DATABASE_URL": self.database.url})

    def _start_step_functions(self) -> dict[str, str]:
        """The migration and rollback state machines, as template.yaml wires them, on moto's executor."""
        from embedsvc.local.stepfunctions import LocalStepFunctions
        from functions.migration.app import HANDLERS

        self.sfn = LocalStepFunctions(HANDLERS, wait_scale=self.wait_scale).install()
        arns = {f"{name}FunctionArn": self.sfn.function_arn(name) for name in HANDLERS}
        machines = ROOT / "statemachines"
        return {
            "MIGRATION_STATE_MACHINE_ARN": self.sfn.create_state_machine(
                "embedsvc-local-migration", machines / "migration.asl.json", arns
            ),
            "ROLLBACK_STATE_MACHINE_ARN": self.sfn.create_state_machine(
                "embedsvc-local-rollback", machines / "rollback.asl.json", arns
            ),
            # Models per content type in SSM, as on AWS, so that a migration can change them.
            "CONTENT_MODELS_PARAMETER": "/embedsvc/local/content-models",
            "CONTENT_MODELS_MAX_AGE_SECONDS": "1",
        }

    def make_poller(self):
        """A poller for IndexQueue with the batch settings of template.yaml."""
        from embedsvc.adapters.aws import client
        from embedsvc.local.poller import SqsPoller, event_source_settings
        from functions.embed_worker.app import lambda_handler as worker_handler

        batch_size, window = event_source_settings(ROOT / "template.yaml")
        return SqsPoller(
            client("sqs"),
            os.environ["INDEX_QUEUE_URL"],
            worker_handler,
            batch_size=batch_size,
            window_seconds=window,
        )

    @property
    def api_url(self) -> str:
        assert self.gateway is not None, "the API is not served"
        return self.gateway.url + "/v1"

    def stop(self) -> None:
        from embedsvc.container import reset_settings

        if self.poller:
            self.poller.stop()
        if self.gateway:
            self.gateway.stop()
        if self.sfn is not None:
            self.sfn.uninstall()
            self.sfn = None
        reset_settings()
        if self.database is not None:
            self.database.close()
            self.database = None
        if self._moto:
            self._moto.stop()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_settings()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["DEFAULT_API_KEY", "LocalStack", "free_port"]
