"""The SIGINT, SIGTERM and SIGUSR1 dispositions of this process, as the kernel and Python's
table see them: what a test, or a caller of a job in-process, must find again after the job.
SIGUSR1 is Ray Tune's: every sweep sets a handler of its own for it."""

from __future__ import annotations

import signal

WATCHED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def _handler_name(handler: object) -> str:
    """A signal handler as a person reads it (SIG_IGN, SIG_DFL, a function's name)."""
    if isinstance(handler, signal.Handlers):
        return handler.name
    if handler is signal.default_int_handler:
        return "signal.default_int_handler"
    name = getattr(handler, "__qualname__", None) or type(handler).__qualname__
    return f"{getattr(handler, '__module__', '?')}.{name}"


def _kernel_dispositions() -> dict[signal.Signals, str]:
    """What the kernel does with each watched signal: ignored, caught or default. Python's
    table (``signal.getsignal``) does not see a disposition C code set (Ray's core resets
    SIGTERM's), and a child process inherits an ignored one: this is what it inherits."""
    try:
        with open("/proc/self/status") as f:
            masks = {
                k: int(v, 16)
                for k, v in (
                    line.split(":", 1) for line in f if line.startswith(("SigIgn:", "SigCgt:"))
                )
            }
    except (OSError, ValueError):  # not Linux: Python's table alone is compared
        return {}
    out = {}
    for sig in WATCHED:
        bit = 1 << (sig - 1)
        out[sig] = (
            "ignored"
            if masks.get("SigIgn", 0) & bit
            else "caught"
            if masks.get("SigCgt", 0) & bit
            else "default"
        )
    return out


def dispositions() -> dict[signal.Signals, str]:
    """Each watched signal's Python handler, and the kernel's action where it can be read."""
    kernel = _kernel_dispositions()
    return {
        sig: _handler_name(signal.getsignal(sig)) + (f" (kernel: {kernel[sig]})" if kernel else "")
        for sig in WATCHED
    }
