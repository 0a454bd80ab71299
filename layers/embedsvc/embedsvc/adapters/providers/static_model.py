"""minilm-m2v-256: a static model2vec model distilled from the bundled all-MiniLM-L6-v2 (256 dims).

It is the deliberately weaker model that the migration gate must refuse: one vector per word piece, PCA'd to
256 dims, averaged over a text (no attention). It is built once, at install time (`embedsvc models build`,
which `make install` runs; 22-124 s on 2 cores, 15.6 MB), into `models_dir() / "minilm-m2v"`; serving it
needs only model2vec and numpy (no torch, no transformers). `EMBEDSVC_MODELS_DIR` moves the directory (on
Lambda, where the repository's `.local/models` does not exist, point it at the shipped model).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from embedsvc.errors import ConfigError

MODEL_NAME = "minilm-m2v-256"
DIRECTORY = "minilm-m2v"
PCA_DIMS = 256
MAX_TOKENS = 512  # the registry's max_input_tokens for minilm-m2v: model2vec truncates there itself
# Written last, after every model file: a directory without it is a build that did not finish.
MARKER = "embedsvc-build.json"
BUILD_COMMAND = "embedsvc models build"

_load_lock = threading.Lock()
_loaded: dict[Path, StaticEncoder] = {}


def models_dir() -> Path:
    """Where built models live: EMBEDSVC_MODELS_DIR, else `.local/models` in the repository."""
    if configured := os.environ.get("EMBEDSVC_MODELS_DIR"):
        return Path(configured)
    # layers/embedsvc/embedsvc/adapters/providers/static_model.py -> the repository
    return Path(__file__).resolve().parents[5] / ".local" / "models"


def model_dir() -> Path:
    """The minilm-m2v model's directory (built or not)."""
    return models_dir() / DIRECTORY


def is_built(directory: Path) -> bool:
    """Whether a finished build lies in `directory`."""
    return (directory / MARKER).is_file()


class StaticEncoder:
    """A loaded model2vec model; one encode at a time (model2vec sets its tokenizer's length per call)."""

    def __init__(self, model, max_tokens: int):
        self.model = model
        self.max_tokens = max_tokens
        self.dimensions = int(model.dim)
        self._encode_lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length vectors, (n, 256) float32; a text with no known word piece gets the zero vector."""
        with self._encode_lock:
            vectors = self.model.encode(
                texts, max_length=self.max_tokens, normalize=False, use_multiprocessing=False
            )
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dimensions)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.where(norms > 0, norms, 1.0)


def load() -> StaticEncoder:
    """The built model, loaded once per process; ConfigError when it is not built or model2vec is missing."""
    directory = model_dir()
    with _load_lock:
        if directory not in _loaded:
            if not is_built(directory):
                raise ConfigError(
                    f"the static model {MODEL_NAME} is not built in {directory}: run `{BUILD_COMMAND}` "
                    "(make install does; EMBEDSVC_MODELS_DIR moves the directory)"
                )
            try:
                from model2vec import StaticModel
            except ImportError as exc:
                raise ConfigError(
                    f"{MODEL_NAME} needs model2vec: pip install model2vec (the 'local' extra has it)"
                ) from exc
            _loaded[directory] = StaticEncoder(StaticModel.from_pretrained(directory), MAX_TOKENS)
        return _loaded[directory]


def build(
    directory: Path, source_model: str, *, info: Callable[[str], None] = print, force: bool = False
) -> bool:
    """Distill the static model from `source_model` into `directory`; False when it was built already.

    The model is written to a sibling temporary directory and renamed into place with its marker, so an
    interrupted build never looks finished.
    """
    if is_built(directory) and not force:
        info(f"{MODEL_NAME}: already built in {directory} (skipped)")
        return False
    try:
        import model2vec
        from model2vec.distill import distill
    except ImportError as exc:
        raise ConfigError(
            "building needs model2vec's distill extra: pip install 'model2vec[distill]'"
        ) from exc
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the source model is a local directory: never the hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(directory.name + ".building")
    shutil.rmtree(staging, ignore_errors=True)
    info(
        f"{MODEL_NAME}: distilling {source_model} with PCA to {PCA_DIMS} dims (20 s to 2 minutes on 2 cores)"
    )
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its "LOAD REPORT" on the unused position_ids is noise here
    started = time.monotonic()
    try:
        model = distill(model_name=source_model, pca_dims=PCA_DIMS)
    finally:
        transformers_logging.set_verbosity(verbosity)
    seconds = time.monotonic() - started
    model.save_pretrained(staging)
    (staging / MARKER).write_text(
        json.dumps(
            {
                "model": MODEL_NAME,
                "source_model": source_model,
                "pca_dims": PCA_DIMS,
                "model2vec": model2vec.__version__,
                "distill_seconds": round(seconds, 1),
            }
        )
    )
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(staging, directory)
    size_mb = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) / 1e6
    info(f"{MODEL_NAME}: built in {seconds:.0f} s into {directory} ({size_mb:.1f} MB)")
    return True
