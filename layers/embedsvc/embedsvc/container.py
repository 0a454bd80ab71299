"""Process-wide components, built on first use from the settings (never at import time).

Handlers and the CLI ask here for the embedding service, the vector store, the ledger, etc.
Tests and the local stack call `reset()` after changing the environment.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

_components: dict[str, Any] = {}
_lock = threading.RLock()


def _get(name: str, factory) -> Any:
    with _lock:
        if name not in _components:
            _components[name] = factory()
        return _components[name]


def put(name: str, component: Any) -> None:
    """Replace a component (tests inject fakes of I/O edges here)."""
    with _lock:
        _components[name] = component


def reset_settings() -> None:
    """Forget cached settings and every component built from them (tests, local stack, after an env change)."""
    from embedsvc.config import get_settings

    get_settings.cache_clear()
    reset()


def reset() -> None:
    """Drop every component; the next use rebuilds it from the (cached) settings."""
    with _lock:
        # A copy: closing the cost recorder flushes it, which may build the roll-up store it writes to.
        for component in list(_components.values()):
            close = getattr(component, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):  # closing is best effort
                    close()
        _components.clear()
    from embedsvc.adapters import aws

    aws.reset()


def settings():
    from embedsvc.config import get_settings

    return get_settings()


def ledger():
    def build():
        from embedsvc.adapters.aws import client
        from embedsvc.services.ratelimit import RateLimitLedger

        s = settings()
        return RateLimitLedger(
            s.ledger_table,
            client("dynamodb", fast=True),
            bulk_ceiling=s.bulk_ceiling,
            bulk_idle_ceiling=s.bulk_idle_ceiling,
            fallback_share=s.ledger_fallback_share,
            fallback_processes=s.ledger_fallback_processes,
            metrics=ops_metrics(),
            lease_seconds=s.ledger_lease_seconds,
            bulk_pace=s.bulk_pace,
            budgets=budgets(),
        )

    return _get("ledger", build)


def budgets():
    """Task and tenant budgets (items in the ledger table): `embedsvc budgets`; the ledger enforces them."""

    def build():
        from embedsvc.adapters.aws import client
        from embedsvc.services.budgets import BudgetStore

        return BudgetStore(settings().ledger_table, client("dynamodb", fast=True))

    return _get("budgets", build)


def cache():
    def build():
        from embedsvc.adapters.aws import client
        from embedsvc.adapters.cache import EmbeddingCache

        s = settings()
        return EmbeddingCache(s.cache_table, client("dynamodb", fast=True), ttl_seconds=s.cache_ttl_seconds)

    return _get("cache", build)


def ops_metrics():
    """Operational metrics (EMF): ledger errors and fallback grants, dead letters; same sink as costs."""

    def build():
        from embedsvc.observability import OpsMetrics

        # Through the current cost recorder, so a sink swapped in later (local stack, tests) gets these too.
        return OpsMetrics(namespace=settings().metrics_namespace, sink=lambda blob: costs().sink(blob))

    return _get("ops_metrics", build)


def costs():
    def build():
        from embedsvc.observability import CostRecorder

        # The roll-up store is built on the first flush with something in it: a process that never
        # spends (the authorizer) never creates its client.
        return CostRecorder(namespace=settings().metrics_namespace, store=cost_store)

    return _get("costs", build)


def cost_store():
    """The daily cost roll-up (COSTS_TABLE): `embedsvc costs`, task spend (`task_totals`), the recorder."""

    def build():
        from embedsvc.adapters.cost_store import CostStore, rollup_client

        return CostStore(settings().costs_table, rollup_client())

    return _get("cost_store", build)


def providers():
    def build():
        from embedsvc.adapters.providers import build_providers

        return build_providers(settings().registry)

    return _get("providers", build)


def router():
    def build():
        from embedsvc.services.router import EmbeddingRouter

        return EmbeddingRouter(providers(), ledger(), provider_specs=settings().registry.providers)

    return _get("router", build)


def embedding_service():
    def build():
        from embedsvc.services.embedding import EmbeddingService
        from embedsvc.services.ratelimit import Lane

        s = settings()
        waits = {Lane.REALTIME: s.realtime_max_wait_seconds, Lane.BULK: s.bulk_max_wait_seconds}
        return EmbeddingService(
            s.registry,
            router(),
            cache(),
            costs(),
            max_wait_seconds=waits,
            bulk_ceiling=s.bulk_ceiling,
            ledger_share=1.0 - s.ledger_fallback_share,
            tenant_share=s.tenant_share,
            shared_cache_max_inputs=s.shared_cache_max_inputs,
        )

    return _get("embedding_service", build)


def search_service():
    """Query texts in, nearest content out: what `/v1/search` and the evaluation both search with."""

    def build():
        from embedsvc.services.search import SearchService

        return SearchService(embedding_service(), vector_store(), settings(), model_config())

    return _get("search_service", build)


def api_keys():
    def build():
        from embedsvc.adapters.aws import client
        from embedsvc.services.auth import ApiKeyStore

        return ApiKeyStore(settings().api_keys_table, client("dynamodb"))

    return _get("api_keys", build)


def vector_store():
    def build():
        from embedsvc.adapters.qdrant import VectorStore

        s = settings()
        api_key = None
        if s.qdrant_url and s.qdrant_api_key_secret:
            from embedsvc.adapters.aws import get_secret

            api_key = get_secret(s.qdrant_api_key_secret)
        return VectorStore.connect(url=s.qdrant_url, path=s.qdrant_path, api_key=api_key)

    return _get("vector_store", build)


def indexer():
    def build():
        from embedsvc.adapters.aws import client
        from embedsvc.adapters.dead_letters import DeadLetterMarks, DeadLetterQueue
        from embedsvc.services.indexing import Indexer

        s = settings()
        marks = DeadLetterMarks(s.state_table, client("dynamodb"))
        return Indexer(
            s,
            embedding_service(),
            vector_store(),
            DeadLetterQueue(s.index_dlq_url, client("sqs"), marks),
            store=content_store() if has_content_store() else None,
            model_config=model_config(),
        )

    return _get("indexer", build)


def database():
    """The content store's Postgres: DATABASE_URL (local) or the RDS secret DATABASE_SECRET_ARN (AWS)."""

    def build():
        from embedsvc.adapters.postgres import ConnectionSettings, Database
        from embedsvc.errors import ConfigError

        s = settings()
        if s.database_url:
            return Database(ConnectionSettings.from_url(s.database_url))
        if s.database_secret_arn:
            import json

            from embedsvc.adapters.aws import get_secret

            secret = json.loads(get_secret(s.database_secret_arn))
            return Database(ConnectionSettings.from_secret(secret, ssl_mode=s.database_ssl_mode))
        raise ConfigError("no content store is configured: set DATABASE_URL or DATABASE_SECRET_ARN")

    return _get("database", build)


def content_store():
    def build():
        from embedsvc.adapters.content_store import ContentStore

        return ContentStore(database(), settings().content_types)

    return _get("content_store", build)


def has_content_store() -> bool:
    """Whether this process is configured with a content store (the worker then loads rows by id)."""
    s = settings()
    return bool(s.database_url or s.database_secret_arn)


def index_queue():
    def build():
        from embedsvc.adapters.aws import client
        from embedsvc.adapters.index_queue import IndexQueue

        return IndexQueue(settings().index_queue_url, client("sqs"))

    return _get("index_queue", build)


def document_service():
    """Write-through indexing of the content store (the /v1/documents routes)."""

    def build():
        from embedsvc.services.documents import DocumentService

        return DocumentService(
            settings(),
            content_store(),
            embedding_service(),
            vector_store(),
            index_queue(),
            model_config=model_config(),
        )

    return _get("document_service", build)


def repair_job():
    """The hourly repair: content changed since its checkpoint, checked against Qdrant itself."""

    def build():
        from embedsvc.services.repair import RepairJob

        return RepairJob(
            content_store(),
            vector_store(),
            index_queue(),
            settings(),
            metrics=ops_metrics(),
            model_config=model_config(),
        )

    return _get("repair_job", build)


def audit_job():
    """The weekly audit: content and points merge-joined per collection, gaps queued, orphans removed."""

    def build():
        from embedsvc.adapters.aws import client
        from embedsvc.services.audit import AuditJob, S3AuditReports

        s = settings()
        reports = S3AuditReports(s.audit_reports_bucket, client("s3")) if s.audit_reports_bucket else None
        return AuditJob(
            content_store(),
            vector_store(),
            index_queue(),
            reports,
            s,
            ops_metrics(),
            orphan_max_share=s.audit_orphan_max_share,
            model_config=model_config(),
        )

    return _get("audit_job", build)


def document_search():
    """`/v1/search`: the search service plus the content store's view of each hit."""

    def build():
        from embedsvc.services.document_search import DocumentSearch

        return DocumentSearch(settings(), content_store(), search_service(), model_config())

    return _get("document_search", build)


def model_config():
    """Which models index each content type: SSM (CONTENT_MODELS_PARAMETER) or the static settings."""

    def build():
        from embedsvc.services.model_config import ModelConfig

        s = settings()
        return ModelConfig(s, prefix=s.content_models_parameter, max_age=s.content_models_max_age_seconds)

    return _get("model_config", build)


def migration_records():
    """The migration lock and records (the state table)."""

    def build():
        from embedsvc.adapters.aws import client
        from embedsvc.services.migration.records import MigrationRecords

        return MigrationRecords(settings().state_table, client("dynamodb"))

    return _get("migration_records", build)


def migration_steps():
    """The model migration's steps (the migration state machine's Lambda tasks)."""

    def build():
        from embedsvc.services.migration.backfill import Backfill
        from embedsvc.services.migration.steps import MigrationSteps, execution_running, load_ground_truth

        records = migration_records()
        return MigrationSteps(
            settings(),
            model_config(),
            vector_store(),
            records,
            Backfill(content_store(), index_queue(), records),
            audit=audit_job,
            gate=migration_gate,
            ground_truth_loader=load_ground_truth,
            execution_running=execution_running,
            # Read when a step needs them: the backfill's cost at the end, its budget while it fills.
            task_costs=lambda task_id: cost_store().task_totals(task_id),
            budgets=budgets(),
        )

    return _get("migration_steps", build)


def migration_gate():
    def build():
        from embedsvc.services.evaluation.runs import open_run_store
        from embedsvc.services.migration.gate import MigrationGate
        from embedsvc.services.migration.steps import runs_location

        return MigrationGate(search_service(), content_store(), open_run_store(runs_location()))

    return _get("migration_gate", build)
