"""``python -m longreach.train --config FILE [key=value ...] [--resume [PATH]]``.

A stop on SIGINT / SIGTERM saves and exits with 128 + the signal number (130 / 143).
Also the entry point for several processes: ``torchrun --nproc_per_node N -m longreach.train ...``.
"""

from __future__ import annotations

import argparse
import os
import sys

from longreach.train import (
    CheckpointError,
    StoppedBySignal,
    TrainingDiverged,
    find_recipe,
    load_config,
    train,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m longreach.train",
        description="Train a longreach model from a recipe (put --resume last, or use --resume=PATH).",
    )
    parser.add_argument("--config", help="recipe YAML or recipe name (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.steps=300")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="PATH",
        help="continue from the newest checkpoint of this run, or from PATH",
    )
    args = parser.parse_args(argv)
    try:
        config = find_recipe(args.config) if args.config is not None else None
        run_dir = train(load_config(config, args.overrides), resume=args.resume, cli=True)
    except (FileNotFoundError, FileExistsError, ValueError, TrainingDiverged) as e:
        # CheckpointError is a ValueError: all of these are the user's to fix, not tracebacks
        kind = "checkpoint error" if isinstance(e, CheckpointError) else "error"
        print(f"{kind}: {e}", file=sys.stderr)
        return 1
    except StoppedBySignal as stop:  # saved; the trainer said "continue with --resume"
        return stop.exit_code
    if os.environ.get("RANK", "0") == "0":
        print(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
