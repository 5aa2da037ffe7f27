"""Launching autotuned kernels: one forced config for tests, a fixed config under the interpreter.

Every op keeps its config list as a module-level constant and wraps its kernel with
``triton.autotune(configs=..., key=...)``. ``launch`` then runs, in order of precedence:
the ``config`` a caller forces (tests check every config's precision this way), the
first config under ``TRITON_INTERPRET=1`` (benchmarking configs there is slow and
meaningless), or the autotuner's choice.
"""
from __future__ import annotations

from typing import Callable, Optional

import triton

from refrag_kernels.common.dispatch import INTERPRET


def launch(tuned: triton.runtime.Autotuner, grid: Callable, config: Optional[triton.Config] = None, **kwargs):
    """Launch the autotuned kernel `tuned` on `grid` with keyword arguments `kwargs`.

    `grid` is a function of the meta-parameters (block sizes), as for any Triton launch.
    A forced config bypasses the autotuner's ``reset_to_zero``, so buffers it lists must
    already be zero.
    """
    if config is None and INTERPRET:
        config = tuned.configs[0]
    if config is None:
        return tuned[grid](**kwargs)
    return tuned.fn[grid](**kwargs, **config.all_kwargs())
