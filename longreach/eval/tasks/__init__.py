"""Long-context eval tasks. Importing this package registers them."""

from longreach.data.synthetic import Haystack, count_tokens, get_haystack
from longreach.eval.tasks import babi as _babi  # noqa: F401  (registers the tasks)
from longreach.eval.tasks import copy as _copy  # noqa: F401
from longreach.eval.tasks import multihop as _multihop  # noqa: F401
from longreach.eval.tasks import niah as _niah  # noqa: F401
from longreach.eval.tasks import passkey as _passkey  # noqa: F401
from longreach.eval.tasks import vt as _vt  # noqa: F401
from longreach.eval.tasks.base import (
    EvalTask,
    Sample,
    available_eval_tasks,
    get_eval_task,
    make_sample,
    register_eval_task,
)

__all__ = [
    "EvalTask",
    "Haystack",
    "Sample",
    "available_eval_tasks",
    "count_tokens",
    "get_eval_task",
    "get_haystack",
    "make_sample",
    "register_eval_task",
]
