"""The ``longreach eval`` subcommand: argument parsing only; the work is in runner.py.

Building the parser imports no torch or transformers (``longreach --help`` builds every
subcommand's): the ``--attention`` kinds, which are ``longreach.integrations.hf``'s, are
read when a value is checked or the help is printed."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections.abc import Callable, Sequence

from longreach.data.prompts import SPLITS
from longreach.eval.tasks import available_eval_tasks, get_eval_task

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20}


def parse_length(text: str) -> int:
    """``"4k"`` -> 4096, ``"1m"`` -> 1048576, ``"1500"`` -> 1500 (tokens)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", text)
    if not match:
        raise ValueError(f"bad length {text!r}: use a token count such as 512, 4k or 1m")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value != int(value) or value < 1:
        raise ValueError(f"bad length {text!r}: must be a positive whole number of tokens")
    return int(value)


def parse_lengths(text: str) -> list[int]:
    return [parse_length(part) for part in text.split(",") if part.strip()]


def parse_depths(text: str) -> list[float]:
    depths = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            depth = float(part)
        except ValueError:
            raise ValueError(f"bad depth {part!r}: use fractions such as 0,0.5,1") from None
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth {depth} is outside [0, 1]")
        depths.append(depth)
    return depths


def parse_options(items: list[str] | None) -> dict:
    """``["keys=4", "value_type=uuid"]`` -> ``{"keys": 4, "value_type": "uuid"}``."""
    options = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"bad --option {item!r}: use KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


class _LazyChoices(Sequence):
    """An option's choices, computed on first use: argparse reads them only to check a value
    or to print the help (given a ``metavar``, adding the option does not list them)."""

    def __init__(self, compute: Callable[[], Sequence[str]]):
        self._compute, self._values = compute, None

    def _get(self) -> tuple[str, ...]:
        if self._values is None:
            self._values = tuple(self._compute())
        return self._values

    def __getitem__(self, index):
        return self._get()[index]

    def __len__(self) -> int:
        return len(self._get())


def _attention_kinds() -> tuple[str, ...]:
    from longreach.eval.attention import ATTENTION_KINDS  # torch and transformers

    return ATTENTION_KINDS


def _command_line(args) -> str:
    """The command as typed (set by the CLI's main), else rebuilt from sys.argv."""
    return getattr(args, "command_line", None) or shlex.join(["longreach", *sys.argv[1:]])


def task_options(args) -> dict:
    """The task options of a parsed ``longreach eval`` command: ``--option``s, ``--digits``
    and ``--split``, each checked against the task."""
    options = parse_options(args.option)
    if args.digits is not None:
        if args.task != "passkey":
            raise ValueError("--digits applies to the passkey task only")
        options["digits"] = args.digits
    if getattr(args, "split", None) is not None:
        if args.task in POSITION_TASKS or "split" not in get_eval_task(args.task).options:
            with_split = [t for t in available_eval_tasks() if "split" in get_eval_task(t).options]
            raise ValueError(f"--split applies to {', '.join(with_split)}, not {args.task}")
        options["split"] = args.split
    return options


def cmd_eval(args) -> int:
    from transformers.utils import logging as hf_logging

    from longreach.eval.attention import attention_settings
    from longreach.eval.runner import run_eval

    hf_logging.disable_progress_bar()  # one progress bar (ours), not the weight loader's

    if args.task in POSITION_TASKS:
        return _cmd_position_task(args)
    options = task_options(args)
    summary = run_eval(
        args.task,
        args.model,
        parse_lengths(args.lengths),
        parse_depths(args.depths),
        samples=args.samples,
        seed=args.seed,
        out_dir=args.out,
        device=args.device,
        dtype=args.dtype,
        max_new_tokens=args.max_new_tokens,
        prefill_chunk=args.prefill_chunk,
        force=args.force,
        haystack=args.haystack,
        options=options,
        attention=attention_settings(args.attention, group_size=args.group_size,
                                     window=args.window, sinks=args.sinks),
        command=_command_line(args),
        progress=not args.quiet,
        tokenizer=args.tokenizer,
        memory=args.memory,
    )
    _print_summary(summary)
    print(f"results in {args.out} (summary.json, summary.csv, heatmap.png)")
    return 0


POSITION_TASKS = ("ppl", "effrem")  # per-position measures of plain text, not prompt grids


def _cmd_position_task(args) -> int:
    from longreach.eval.attention import attention_settings

    if args.option or args.digits is not None or getattr(args, "split", None) is not None:
        raise ValueError(f"--option / --digits / --split do not apply to {args.task}")
    if args.task != "ppl" and getattr(args, "max_context", None):
        raise ValueError(f"--max-context applies to ppl, not to {args.task}")
    common = dict(samples=args.samples, seed=args.seed, out_dir=args.out, device=args.device,
                  dtype=args.dtype, prefill_chunk=args.prefill_chunk, force=args.force,
                  haystack=args.haystack, command=_command_line(args),
                  progress=not args.quiet, tokenizer=args.tokenizer, memory=args.memory,
                  attention=attention_settings(args.attention, group_size=args.group_size,
                                               window=args.window, sinks=args.sinks))
    if args.task == "ppl":
        from longreach.eval.ppl import print_ppl, run_ppl

        max_context = parse_length(args.max_context) if args.max_context else None
        print_ppl(run_ppl(args.model, parse_lengths(args.lengths),
                          bucket=parse_length(args.bucket), max_context=max_context, **common))
        print(f"results in {args.out} (summary.json, summary.csv, ppl.png)")
    else:
        from longreach.eval.effrem import print_effrem, run_effrem

        print_effrem(run_effrem(args.model, parse_length(args.T), points=args.points, **common))
        print(f"results in {args.out} (summary.json, summary.csv, effrem.png)")
    return 0


def _print_summary(summary: dict) -> None:
    metric = summary["metric"]
    print(f"{summary['task']}: {metric} per (length, depth); evaluated {summary['evaluated']}, "
          f"reused {summary['skipped']}")
    for row in summary["cells"]:
        value = f"{row[metric]:.3f}" if row["n"] else "-"
        print(f"  length={row['length']:>8}  depth={row['depth']:<5g} n={row['n']:<3} {value}")
    if summary["overall"] is not None:
        print(f"overall {metric}: {summary['overall']:.3f}")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``eval`` to an ``add_subparsers()`` object; sets ``func=cmd_eval``."""
    p = subparsers.add_parser(
        "eval",
        help="long-context eval (passkey, niah, ...) over a length x depth grid",
        description="Evaluate a saved model on a synthetic long-context task. Lengths are in "
        "tokens of the model's tokenizer (1k = 1024, 1m = 1048576). Re-running the same "
        "command resumes: finished samples in --out are kept.",
    )
    p.add_argument("task", choices=[*available_eval_tasks(), *POSITION_TASKS],
                   help="the eval task")
    p.add_argument("--model", required=True,
                   help="saved model folder (config.json + weights + tokenizer) or a shipped "
                   "checkpoint name (gca-tiny, swa-tiny); a folder of that name wins")
    p.add_argument("--tokenizer", default=None, metavar="byte|DIR",
                   help="tokenizer to use: 'byte' or a tokenizer folder (default: the model "
                   "folder's own; needed when the folder was saved without one)")
    p.add_argument("--lengths", default="1k,4k,16k", help="comma-separated prompt lengths")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=5, help="prompts per (length, depth) cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (results.jsonl, summary, heatmap)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, "
                   "bfloat16, float16")
    p.add_argument("--force", action="store_true",
                   help="run even when the KV cache estimate exceeds free memory")
    p.add_argument("--memory", default=None, metavar="cpu|device|disk:PATH",
                   help="GCA models: where the chunk keys/values live (default: the model's "
                   "setting, cpu); disk:PATH keeps them in memory-mapped files in PATH, for "
                   "contexts larger than RAM")
    p.add_argument("--digits", type=int, default=None,
                   help="passkey digits (default 5; 4-7 with --split train / heldout)")
    p.add_argument("--split", default=None, choices=SPLITS,
                   help="passkey prompt phrasings: template (the classic prompt, default), "
                   "train (those training may use) or heldout (never used in training)")
    p.add_argument("--haystack", default="builtin",
                   help="filler: builtin (the bundled corpus), heldout (the Python language "
                   "reference, never used in training), noise (RULER's), a text file (one "
                   "document per paragraph) or a corpus (.jsonl[.gz], .parquet, a folder: its "
                   "documents whole, e.g. a held-out split of longreach corpus build-pycode)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate (default: the answer's length + 4)")
    p.add_argument("--prefill-chunk", type=int, default=4096,
                   help="prompt tokens fed to the model per forward pass")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="task option, e.g. value_type=uuid, keys=4, hops=3 (repeatable)")
    p.add_argument("--attention", default="full", choices=_LazyChoices(_attention_kinds),
                   metavar="KIND",
                   help="for a Llama / Qwen2 / Mistral folder: its own attention (full: with "
                   "the plug-in settings it was saved with, if any) or a longreach plug-in; "
                   "one of %(choices)s")
    p.add_argument("--group-size", type=int, default=None, help="cca group size (default 16)")
    p.add_argument("--window", type=int, default=None,
                   help="cca / streaming / lm-infinite local window (default 1024)")
    p.add_argument("--sinks", type=int, default=None,
                   help="streaming / lm-infinite sink tokens (default 4)")
    p.add_argument("--bucket", default="1k", help="ppl: position bucket width in tokens")
    p.add_argument("--max-context", default=None, metavar="N",
                   help="ppl: the control run, each token predicted from at most N previous "
                   "tokens of the same documents (windows of N stepped by N/2, each a fresh "
                   "sequence); compare it bucket by bucket with the full-context run")
    p.add_argument("--T", default="4k", help="effrem: the position T whose prediction is compared")
    p.add_argument("--points", type=int, default=16, help="effrem: log-spaced cut points t")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)
    return p
