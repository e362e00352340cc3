"""Which CUDA device a thread works on."""

from __future__ import annotations

import torch


def bind_thread(device) -> None:
    """Make `device` the calling thread's current CUDA device (a no-op for a CPU device or None).

    CUDA's current device belongs to a thread and starts at GPU 0 in every new thread. Work that
    names no device (`torch.cuda.Event().record()`, a CUDA graph's `replay()`, `current_stream()`)
    goes to the current one, so an engine on GPU 1 whose threads never said so would record events
    and replay graphs against GPU 0. Every thread that runs an engine's device work calls this first.
    """
    if device is None:
        return
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:  # bare "cuda": the thread's current one, as torch reads it
        torch.cuda.set_device(device)


def resolve(device) -> torch.device:
    """`device` as a torch.device with its index filled in: a bare "cuda" becomes the calling thread's
    current GPU, so that threads started later (where the current GPU is 0 again) bind to the same one."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
