"""A notebook or a service calling a job in-process, run as a process of its own so that Ray
is not started yet (ray.init installs a SIGTERM handler of its own). It calls one entry point
(``ingest``, ``pretrain``, ``sweep``; ``sweep-refused`` asks for a trial the local instance
cannot hold, ``sweep-finished`` runs one short trial to its end), sending itself SIGTERM (or SIGINT) once Ray is up when a signal is named, and
prints a JSON line: the dispositions before and after, and what the call raised.

``python tests/in_process_caller.py ENTRY SIGNAL|none SOURCE OUT`` (SOURCE: images for
``ingest``, shards for the others)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from signal_state import dispositions

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def signal_once_ray_is_up(sig: int) -> None:
    """Send this process ``sig`` as soon as Ray is initialised (from within the job's call)."""

    def send() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            # read while the job imports ray: the module may be there half-initialised
            is_initialized = getattr(sys.modules.get("ray"), "is_initialized", None)
            if is_initialized is not None and is_initialized():
                os.kill(os.getpid(), sig)
                return
            time.sleep(0.05)

    threading.Thread(target=send, daemon=True).start()


def call(entry: str, source: str, out: str) -> None:
    from radjepa.config import load_config

    sets = {
        "train.output_dir": out,
        "train.batch_size": 8,
        "train.steps": 400,
        "train.num_workers": 1,
        "data.holdout_fraction": 0.0,
        "tune.name": "s",
        "tune.search_alg": "grid",
        "tune.search_space": {"ema.start": {"type": "grid", "values": [0.99, 0.996]}},
    }
    if entry == "sweep-refused":
        sets["train.cpus_per_worker"] = 16
    if entry == "sweep-finished":
        sets.update(
            {
                "train.steps": 2,
                "train.checkpoint_every": 2,
                "tune.asha": False,
                "tune.collapse_rankme": 0.0,
                "tune.search_space": {"ema.start": {"type": "grid", "values": [0.99]}},
            }
        )
    cfg = load_config(CONFIGS / "tiny_cpu.yaml", sets)
    if entry == "ingest":
        from pipelines.ingest import run_ingest_until_stopped

        run_ingest_until_stopped([source], str(Path(out) / "shards"), cfg)
    elif entry == "pretrain":
        from pipelines.pretrain import run_pretrain

        run_pretrain(cfg, source)
    else:
        from pipelines.sweep import run_sweep

        run_sweep(cfg, source)


def main() -> None:
    entry, sig, source, out = sys.argv[1:5]
    before = dispositions()
    if sig != "none":
        signal_once_ray_is_up(getattr(signal, sig))
    raised = None
    try:
        call(entry, source, out)
    except BaseException as err:  # noqa: BLE001 - what the caller got is the result
        raised = f"{type(err).__name__}: {err}"
    after = dispositions()
    print(  # noqa: T201 - the result, read by the test
        json.dumps(
            {
                "before": {s.name: d for s, d in before.items()},
                "after": {s.name: d for s, d in after.items()},
                "raised": raised,
            }
        )
    )


if __name__ == "__main__":
    main()
