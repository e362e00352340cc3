"""Whether this process can run the project's Triton kernels (`tts.f5.conv_kernel`,
`tts.spark.attention_kernel`): CUDA, and a Triton that imports and compiles their definitions.
CPU builds of torch come without Triton; the kernels' modules import it only when built."""

from __future__ import annotations

from typing import Callable

import torch


def can_run(build: Callable[[], object]) -> bool:
    """True where CUDA is there and build() (a module's lazy kernel definitions) succeeds."""
    if not torch.cuda.is_available():
        return False
    try:
        build()
    except Exception:  # noqa: BLE001 - no Triton (CPU builds) or an incompatible one
        return False
    return True
