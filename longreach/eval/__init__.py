"""Long-context evaluation: synthetic tasks, scoring, and the grid runner.

    from longreach.eval import run_eval
    run_eval("passkey", "runs/tiny-swa/final", lengths=[1024, 4096], samples=5, out_dir="ev")

Importing this package registers the eval tasks (the training tasks, ``passkey`` among them,
are ``longreach.data``'s). ``longreach.eval.lm_eval`` is the lm-evaluation-harness adapter.
"""

from longreach.eval.scoring import contains, exact_match, first_token_match, recall
from longreach.eval.tasks import Sample, available_eval_tasks, get_eval_task, make_sample

__all__ = [
    "Sample",
    "available_eval_tasks",
    "contains",
    "exact_match",
    "first_token_match",
    "get_eval_task",
    "make_sample",
    "recall",
    "run_eval",
]


def __getattr__(name):
    # the runner pulls in torch and transformers: load it only when asked for
    if name == "run_eval":
        from longreach.eval.runner import run_eval

        return run_eval
    raise AttributeError(f"module 'longreach.eval' has no attribute {name!r}")
