"""``longreach bench host-syncs``: count the host-device synchronizations of one training
step of a recipe's model (CUDA).

Runs forward + backward + gradient clipping + AdamW step on random tokens under
``torch.cuda.set_sync_debug_mode("warn")`` and counts the synchronizing calls of one step after
warm-up, with where each comes from (the Python line that triggered it):

    longreach bench host-syncs --recipe gca-128m --batch 2
    longreach bench host-syncs --recipe mamba2-130m --batch 8

The trainer itself adds one deliberate sync per optimizer step (the loss / grad-norm / stop
flags read back together, which is also its NaN check); it is not part of this count.
"""

from __future__ import annotations

import collections
import json
import sys
import warnings
from pathlib import Path

import torch

from longreach.models import build_model
from longreach.models.compat import enable_checkpointing
from longreach.runtime import resolve_device, write_atomic


def _short(filename: str) -> str:
    """``longreach/...`` or ``torch/...`` instead of the machine's absolute path."""
    path, found = Path(filename).resolve(), []
    for root in (Path(__file__).resolve().parents[2], *map(Path, sys.path)):
        try:
            found.append(str(path.relative_to(Path(root).resolve())))
        except (ValueError, OSError):
            continue
    return min(found, key=len, default=filename)  # from the closest root


def count_step_syncs(recipe: str, *, batch: int, seq_len: int | None, steps: int = 2) -> dict:
    from longreach.train import find_recipe, load_config

    device = torch.device("cuda")
    cfg = load_config(find_recipe(recipe), [])
    seq_len = seq_len or cfg.data.seq_len
    model = build_model(cfg.model).to(device)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: compilation and autotuning may sync
    torch.cuda.synchronize()
    per_step = []
    sites: collections.Counter = collections.Counter()
    for _ in range(steps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        per_step.append(len(syncs))
        sites.update(f"{_short(w.filename)}:{w.lineno}" for w in syncs)
    torch.cuda.synchronize()
    return {"recipe": recipe, "batch": batch, "seq_len": seq_len, "syncs_per_step": per_step,
            "sites": dict(sites.most_common())}


def run(args) -> int:
    """Count every --recipe's syncs, print them as JSON and write them to --out."""
    resolve_device("cuda")  # a clear error on a machine without CUDA
    rows = [count_step_syncs(r, batch=args.batch, seq_len=args.seq_len) for r in args.recipe]
    text = json.dumps(rows, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, text + "\n")
    return 0
