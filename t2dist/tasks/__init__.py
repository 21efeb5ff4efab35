"""Tasks: deterministic splits, prompt formats and verifiers.  Importing this package registers all built-in tasks."""
from t2dist.tasks.base import SPLITS, TASKS, Example, Task, Verdict, get_task, register_task

from t2dist.tasks import synthetic  # noqa: F401,E402  (registers the synthetic suite)
from t2dist.tasks import benchmarks  # noqa: F401,E402  (gsm8k, mbpp, humaneval, hendrycks_math, arc_*)
from t2dist.tasks import adaptation  # noqa: F401,E402  (caps, dispatch, mixed: the self-adaptation stage)
from t2dist.tasks import arith  # noqa: F401,E402  (arith, arith_hard: multi-digit arithmetic for real models)
from t2dist.tasks import arc_text  # noqa: F401,E402  (arc_easy_text: ARC-Easy answered with the option text)
from t2dist.tasks import words  # noqa: F401,E402  (alphabetical: which of two words comes first)
from t2dist.tasks import sentiment  # noqa: F401,E402  (sentiment: the third kind of the real two-pass)
from t2dist.tasks import pyfunc  # noqa: F401,E402  (pyfunc: short Python functions judged in the sandbox)
from t2dist.tasks import adaptation_real  # noqa: F401,E402  (mixed_real, dispatch_real: the real-model two-pass)

__all__ = ["SPLITS", "TASKS", "Example", "Task", "Verdict", "get_task", "register_task"]
