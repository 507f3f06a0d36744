"""The compile budget: how many programs one process may compile before ``_ANEInMemoryModel`` breaks.

The original trainer counts successful compile+load pairs per process; past about 119 (119-132 reported on
M4, docs/ane.md appendix A.4) compiles fail, because ``compileWithQoS:`` leaks (maderix/ANE #54). The original
``exec()``-restarts itself from a checkpoint before its limit of 100. anetrain never restarts the user's
process: ANE work runs in a worker process (:mod:`.supervisor`) that is replaced, and its programs
recompiled, when its budget is used up. With the dynamic kernel set (weights are inputs, each program
compiled once) a run needs about 10-20 compiles, so replacements only happen in long sessions that change
shapes. The in-process executor (:class:`.runtime.AneRuntimeExecutor`) refuses to go past the budget.
"""

from __future__ import annotations

import os

from ...errors import ConfigError

DEFAULT_COMPILE_BUDGET = 100
ENV_BUDGET = "ANETRAIN_ANE_COMPILE_BUDGET"


def compile_budget(value: int | None = None) -> int:
    """The budget to use: ``value``, else ``$ANETRAIN_ANE_COMPILE_BUDGET``, else 100."""
    if value is None:
        raw = os.environ.get(ENV_BUDGET)
        if raw is None or not raw.strip():
            return DEFAULT_COMPILE_BUDGET
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{ENV_BUDGET} must be a whole number, got {raw!r}") from None
    if value < 1:
        raise ConfigError(f"the ANE compile budget must be at least 1, got {value}")
    return int(value)


def needs_fresh_process(compiled: int, budget: int) -> bool:
    """Whether a process that has ``compiled`` programs must be replaced before compiling one more."""
    return compiled >= budget
