"""`embedsvc models build`: build the local models that are made at install time, not shipped in a package.

Today that is minilm-m2v (a static model2vec model distilled from the bundled all-MiniLM-L6-v2), built into
EMBEDSVC_MODELS_DIR (default: .local/models in the repository). `make install` runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def cmd_models_build(args: argparse.Namespace) -> int:
    """Build every model not built yet (or all with --force); progress on stderr, a JSON summary on stdout."""
    from embedsvc.adapters.providers import static_model
    from embedsvc.adapters.providers.local_model import model_path

    directory = static_model.model_dir()

    def info(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    built = static_model.build(directory, model_path(), info=info, force=args.force)
    name = static_model.MODEL_NAME
    print(
        json.dumps(
            {
                "built": [name] if built else [],
                "skipped": [] if built else [name],
                "directory": str(directory),
            }
        )
    )
    return 0


def add_models_parser(commands: Any) -> None:
    """Register `models build`."""
    models = commands.add_parser("models", help="local models built at install time: build")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build",
        help="distill minilm-m2v from the bundled MiniLM into EMBEDSVC_MODELS_DIR "
        "(default .local/models; skipped when already built)",
    )
    build.add_argument("--force", action="store_true", help="rebuild even when already built")
    build.set_defaults(func=cmd_models_build)
