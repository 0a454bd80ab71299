"""Throughput of every model the registry serves on the in-process "local" provider, on this machine.

For the break-even (`embedsvc costs break-even --tokens-per-second X ...`): texts/s and tokens/s at a
realistic batch (64 Bible verses, the BSB translation from ../shared/data), after one warm-up batch that
loads the model. Each model encodes the same sequence of distinct batches for at least --seconds.

Tokens are counted twice: by the model's own tokenizer (WordPiece, with [CLS]/[SEP], what its 256-token
window sees) and with cl100k_base, the tokenizer text-embedding-3 bills by. The break-even compares with
an API priced per cl100k token, so `cl100k_tokens_per_second` is the figure to give it.

The last stdout line is one JSON object. Timings vary with whatever else runs on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from _common import ROOT, emit

DATA = ROOT.parent / "shared" / "data" / "bible" / "bsb_verses.jsonl"


def load_texts(path: Path, limit: int) -> list[str]:
    texts = []
    with path.open() as fh:
        for line in fh:
            text = json.loads(line)["text"].strip()
            if text:
                texts.append(text)
            if len(texts) >= limit:
                break
    return texts


def local_models() -> list:
    """The registry's models whose endpoint is a provider of kind `local`."""
    from embedsvc import container

    registry = container.settings().registry
    local = {key for key, p in registry.providers.items() if p.kind == "local"}
    found = []
    for spec in registry.models.values():
        endpoint = next((e for e in spec.endpoints if e.provider in local), None)
        if endpoint is not None:
            found.append((spec, registry.providers[endpoint.provider], endpoint.model_name))
    return found


def measure(spec, provider_spec, model_name: str, texts: list[str], batch: int, seconds: float) -> dict:
    from embedsvc.adapters.providers.local_model import LocalModelProvider
    from embedsvc.config import DEFAULT_REGISTRY, ModelSpec
    from embedsvc.services.tokens import count_tokens

    provider = LocalModelProvider(provider_spec)
    batches = [texts[i : i + batch] for i in range(0, len(texts) - batch + 1, batch)]
    started = time.perf_counter()
    provider.embed(batches[0], model_name)  # warm-up: loads the weights, first-call allocations
    warmup = time.perf_counter() - started
    te3s = ModelSpec(**DEFAULT_REGISTRY["models"]["te3s"])
    done, own_tokens, billed_tokens, elapsed = 0, 0, 0, 0.0
    index = 1
    while elapsed < seconds or done < 3:
        chunk = batches[index % len(batches)]
        index += 1
        t0 = time.perf_counter()
        result = provider.embed(chunk, model_name)
        elapsed += time.perf_counter() - t0
        assert result.vectors.shape == (len(chunk), spec.dimensions)
        done += 1
        own_tokens += sum(count_tokens(spec, chunk))  # counted outside the timed encode
        billed_tokens += sum(count_tokens(te3s, chunk))
    texts_done = done * batch
    return {
        "model": spec.name,
        "dimensions": spec.dimensions,
        "batch": batch,
        "batches": done,
        "texts": texts_done,
        "seconds": round(elapsed, 3),
        "warmup_seconds": round(warmup, 3),
        "texts_per_second": round(texts_done / elapsed, 1),
        "tokens_per_second": round(own_tokens / elapsed, 1),
        "cl100k_tokens_per_second": round(billed_tokens / elapsed, 1),
        "tokens_per_text": round(own_tokens / texts_done, 1),
        "cl100k_tokens_per_text": round(billed_tokens / texts_done, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="timed encoding per model (default: 10)")
    parser.add_argument("--verses", type=Path, default=DATA)
    parser.add_argument("--models", help="comma-separated model keys (default: every local model)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.verses.exists():
        print(f"error: {args.verses} not found (../shared/data beside the repository)", file=sys.stderr)
        return 2
    texts = load_texts(args.verses, 64 * 100)
    wanted = set(args.models.split(",")) if args.models else None
    results: dict[str, dict] = {}
    for spec, provider_spec, model_name in local_models():
        if wanted is not None and spec.key not in wanted:
            continue
        print(f"{spec.key} ({model_name}) ...", file=sys.stderr, flush=True)
        try:
            results[spec.key] = measure(spec, provider_spec, model_name, texts, args.batch, args.seconds)
        except Exception as exc:  # not installed or not built: say so, measure the others
            results[spec.key] = {"model": spec.name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(f"  {json.dumps(results[spec.key])}", file=sys.stderr, flush=True)
    threads = None
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        pass
    emit(
        {
            "benchmark": "local_model_throughput",
            "data": str(args.verses.relative_to(ROOT.parent))
            if args.verses.is_relative_to(ROOT.parent)
            else str(args.verses),
            "batch": args.batch,
            "cpu_count": os.cpu_count(),
            "torch_threads": threads,
            "machine": platform.machine(),
            "python": platform.python_version(),
            "models": results,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
