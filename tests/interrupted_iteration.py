"""Run in its own process by tests/test_ray_shutdown.py: a driver iterating a Ray Data dataset
is interrupted (KeyboardInterrupt in its loop, as Ctrl-C or a routed SIGTERM raises there) and
stops Ray as an interrupted command does, inside the ``except`` block (the traceback, and with
it the iteration's frames, still alive). Prints one JSON line: what was still running, and
what was still unfreed, when ray.shutdown began."""

from __future__ import annotations

import gc
import json
import sys
import threading
import time

import ray

from pipelines.runtime import stop_ray_before_last_word

seen: dict[str, object] = {}


class Sentinel:
    """In a reference cycle with an object reference: says when, and where, it was freed."""

    def __del__(self) -> None:
        seen.setdefault("freed_on_main", threading.current_thread() is threading.main_thread())
        seen.setdefault("freed_with_ray_up", ray.is_initialized())


def _observed(shutdown):
    def run(*args, **kwargs):
        seen["threads_at_shutdown"] = sorted(t.name for t in threading.enumerate())
        seen["sentinel_freed_before_shutdown"] = "freed_on_main" in seen
        return shutdown(*args, **kwargs)

    return run


def _slow(batch):
    time.sleep(0.05)
    return batch


def main() -> None:
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False)
    ds = ray.data.range(400, override_num_blocks=40).map_batches(_slow, batch_size=None)
    held = []
    for _ in range(3):  # cycles holding object references, old by the time Ray stops
        cycle = [Sentinel(), ray.put(b"x" * 1024)]
        cycle.append(cycle)
        held.append(cycle)
    gc.collect()
    gc.collect()
    del held, cycle
    ray.shutdown = _observed(ray.shutdown)
    try:
        for k, _batch in enumerate(ds.iter_batches(batch_size=None, batch_format="pyarrow")):
            if k == 2:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        stop_ray_before_last_word()
    print(json.dumps({**seen, "ray_up_after": ray.is_initialized()}))  # noqa: T201


if __name__ == "__main__":
    sys.exit(main())
