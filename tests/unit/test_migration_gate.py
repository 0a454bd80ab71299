"""The migration gate under concurrent writes: a delete made while it searches must not decide it.

The search service and the content store are small in-memory doubles here: what is tested is the
gate's own order of work (which collection is searched when, what is scored). The whole gate, on the
real search path with real models, runs in tests/integration/test_migration_workflow.py.
"""

from __future__ import annotations

import pytest

from embedsvc.adapters.content_store import PointState
from embedsvc.adapters.qdrant import Hit
from embedsvc.services.evaluation.groundtruth import EvalDataError, GroundTruth
from embedsvc.services.evaluation.runs import LocalRunStore
from embedsvc.services.migration.gate import MigrationGate

DOCS = [f"d{n}" for n in range(20)]
QUERIES = {f"q{n}": f"query {n}" for n in range(40)}


def ground_truth() -> GroundTruth:
    # q{n}'s one relevant document is d{n % 10}: d0..d9 are each the answer to 4 queries
    return GroundTruth(
        name="toy",
        queries=dict(QUERIES),
        qrels={qid: {f"d{int(qid[1:]) % 10}": 1} for qid in QUERIES},
    )


class Corpus:
    """The content store and both collections at once: a delete or an update reaches all three."""

    def __init__(self) -> None:
        self.versions = dict.fromkeys(DOCS, 1)

    def iter_point_states(self, content_type: str):
        for doc, version in self.versions.items():
            yield PointState(f"p-{doc}", "hash", version, False, doc, None)

    def ranking(self, text: str) -> list[Hit]:
        # Both models rank alike: the query's relevant document first, the rest after it
        n = int(text.split()[1])
        order = [f"d{n % 10}"] + [doc for doc in DOCS if doc != f"d{n % 10}"]
        return [Hit(doc, 1.0 - i / 100, {}) for i, doc in enumerate(order) if doc in self.versions]


class SearchDuringWrites:
    """A search service whose first call is followed by a writer's deletes and an update."""

    def __init__(self, corpus: Corpus, deletes: list[str], updates: list[str]):
        self.corpus = corpus
        self.pending = (deletes, updates)
        self.calls: list[tuple[str, int]] = []

    def search(self, model_key, collection, query_texts, limit, *, context, lane, **_):
        self.calls.append((collection, len(query_texts)))
        answers = [self.corpus.ranking(text)[:limit] for text in query_texts]
        if self.pending:
            deletes, updates = self.pending
            self.pending = None
            for doc in deletes:
                del self.corpus.versions[doc]
            for doc in updates:
                self.corpus.versions[doc] += 1
        return answers


def run_gate(search: SearchDuringWrites, corpus: Corpus, tmp_path):
    gate = MigrationGate(search, corpus, LocalRunStore(tmp_path))
    return gate.evaluate(
        ground_truth(), "verse", "old", "new", max_metric_drop=1.0, alpha=0.05, task_id="mig-1"
    )


def test_a_delete_while_the_gate_searches_does_not_fail_a_model_that_ranks_alike(tmp_path):
    # Given two collections that rank alike, and a writer that deletes the answers to 12 of the
    # 40 queries (and updates one more document) right after the gate's first search
    corpus = Corpus()
    search = SearchDuringWrites(corpus, deletes=["d0", "d1", "d2"], updates=["d3"])
    # When the gate compares them
    result = run_gate(search, corpus, tmp_path)
    # Then it passes with equal metrics: the changed documents are out of both runs
    assert result.passed, result.comparison.regressions
    assert result.old.aggregate == result.new.aggregate
    assert result.old.aggregate["recall_at_5"] == 1.0
    assert result.changed_during_gate == 4
    assert result.to_dict()["changed_during_gate"] == 4
    # and the queries whose answer changed were not scored: 40 - 4 x 4
    assert result.comparison.queries == 24
    # and the collections were searched batch by batch, each batch on both, old first
    assert search.calls == [
        ("verse_old", 32),
        ("verse_new", 32),
        ("verse_old", 8),
        ("verse_new", 8),
    ]


def test_the_gate_refuses_to_compare_when_every_answer_changed(tmp_path):
    # Given a writer that deletes every judged-relevant document during the gate
    corpus = Corpus()
    search = SearchDuringWrites(corpus, deletes=[f"d{n}" for n in range(10)], updates=[])
    # When the gate runs, Then it says nothing is left to compare (not a pass, not a refusal)
    with pytest.raises(EvalDataError, match="changed while the gate searched"):
        run_gate(search, corpus, tmp_path)


def test_the_gate_still_refuses_a_collection_that_ranks_worse(tmp_path):
    # Given a candidate that puts the relevant document at rank 6 for every query, with no writes
    corpus = Corpus()

    class WorseCandidate(SearchDuringWrites):
        def search(self, model_key, collection, query_texts, limit, *, context, lane, **_):
            answers = super().search(model_key, collection, query_texts, limit, context=context, lane=lane)
            if model_key == "new":  # scores decide the order, so they are given anew
                reordered = [ranked[1:6] + ranked[:1] + ranked[6:] for ranked in answers]
                answers = [[Hit(h.id, 1.0 - i / 100, {}) for i, h in enumerate(r)] for r in reordered]
            return answers

    search = WorseCandidate(corpus, deletes=[], updates=[])
    # When the gate compares, Then it refuses
    result = run_gate(search, corpus, tmp_path)
    assert not result.passed
    assert "recall_at_5" in result.comparison.regressions
    assert result.changed_during_gate == 0
