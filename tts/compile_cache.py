"""On-disk caches for torch.compile, shared by both families' CUDA fast paths.

Inductor's FX-graph and AOTAutograd caches (and Triton's kernel cache) under the studio's data
directory, so a server restart reuses what the last start compiled.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DATA_DIR_ENV = "STUDIO_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/voice-studio"  # same default as studio.config (tts never imports studio)
CACHE_SUBDIR = "compile-cache"


def default_cache_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser() / CACHE_SUBDIR


def configure_compile_cache(cache_dir: str | Path | None = None) -> Path:
    """Point inductor's and Triton's on-disk caches under `cache_dir` (unless the environment already
    names them) and switch on the FX-graph and AOTAutograd caches, so a restart reuses compiled code.
    Must run before the first compile in the process."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    try:
        import torch._functorch.config as functorch_config

        functorch_config.enable_autograd_cache = True
    except (ImportError, AttributeError):  # older torch: the FX graph cache alone still helps
        pass
    if not os.path.basename(sys.executable or "").startswith("python"):
        # Inductor's compile workers are `sys.executable` subprocesses; inside an embedding host whose
        # executable is not Python, compile in-process instead (slower cold start, same code).
        inductor_config.compile_threads = 1
    return root
