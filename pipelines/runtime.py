"""Connecting to Ray the same way from every job: a cluster when one is named, else local.

Inside a Ray Job (``radjepa submit``) RAY_ADDRESS is set and we join that cluster. On a laptop we
start a local instance with more logical CPUs than cores: Ray Train workers reserve CPUs that Ray
Data then cannot use, and on a 2-core machine the data pipeline would otherwise starve.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# What every worker of a local instance gets: the hook below runs first, and Ray Train's
# preemption watcher is off (it watches for cloud nodes being drained, which a single local
# node never is; each run would start one more process for it, and it logs an error line
# about its own restart policy at every start).
LOCAL_RUNTIME_ENV = {
    "worker_process_setup_hook": "pipelines.runtime.quiet_local_worker_logs",
    "env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"},
}

_PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_NO_STATE_API = "Failed to query Ray Train Controller actor state"


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_local_worker_logs() -> None:
    """Ray worker setup hook of the local instance: drop one warning that would repeat every
    second of every training run.

    Ray Train starts a placement-group cleaner beside each run that asks the state API once a
    second whether the run's controller is still alive, to free its resources if it crashed.
    The local instance has no dashboard, hence no state API (with a dashboard, two local
    instances on one machine make the state API refuse to pick one), so each query fails and
    logs a warning: thousands of lines an hour in the user's terminal. The cleaner has nothing
    to protect there anyway: a local instance and everything in it ends with the driver that
    started it. On a cluster the dashboard is up and the hook is not installed.
    """
    logger = logging.getLogger(_PG_CLEANER_LOGGER)
    if not any(isinstance(f, _DropPrefix) for f in logger.filters):
        logger.addFilter(_DropPrefix(_NO_STATE_API))


class ClusterResourceError(RuntimeError):
    """The cluster can never provide what the job asks for (told to the user, no traceback)."""


def ensure_ray(min_logical_cpus: int = 4) -> None:
    """Initialise Ray once per process (idempotent)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    cores = os.cpu_count() or 1
    num_cpus = max(min_logical_cpus, 2 * cores)
    log.info("starting local Ray with %d logical CPUs on %d cores", num_cpus, cores)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        configure_logging=False,
        runtime_env=LOCAL_RUNTIME_ENV,
    )


def cluster_has_gpus() -> bool:
    """Whether the connected cluster advertises any GPU (never request one that is absent)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0)) > 0.0


def resolve_use_gpu(setting: str) -> bool:
    """Map a config's ``use_gpu`` ('auto'|'true'|'false') onto the cluster in hand."""
    if setting == "true":
        if not cluster_has_gpus():
            raise ClusterResourceError(
                "use_gpu=true but the Ray cluster has no GPUs: the job would wait forever. "
                "Use --set train.use_gpu=auto or add GPU workers."
            )
        return True
    if setting == "false":
        return False
    return cluster_has_gpus()


def max_parallel_trials(workers: int, cpus_per_worker: float, use_gpu: bool) -> int:
    """How many sweep trials of ``workers`` ranks fit side by side, with the same budget as
    :func:`resolve_num_workers` (a GPU per rank; ranks' CPUs in half the CPUs, Ray Data's
    readers in the other half). Unbounded, Tune started every trial at once: they held CPUs
    waiting for ranks that could not start and starved Ray Data, so no trial read a shard."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0.0)), int(res.get("GPU", 0.0))
    per_trial = workers * cpus_per_worker
    if use_gpu:
        fit = min(gpus // workers, int(cpus // per_trial))
    else:
        fit = int(cpus / 2 // per_trial)
    if fit < 1:  # nothing fits now: an autoscaler may add nodes for the one pending trial
        need = f"{workers} GPUs and " if use_gpu else ""
        log.warning(
            "one sweep trial needs train.num_workers=%d ranks (%s%g CPUs) but the cluster has "
            "%d GPUs and %g CPUs now: running one trial at a time (lower train.num_workers if "
            "no node will be added)",
            workers,
            need,
            per_trial,
            gpus,
            cpus,
        )
    return max(1, fit)


def resolve_num_workers(use_gpu: bool, cpus_per_worker: float) -> int:
    """``train.num_workers=0``: one DDP rank per GPU of the cluster; on CPU, as many ranks as
    fit in half the logical CPUs, because Ray Data's readers and decoders need the other half
    (starved, they stall the ranks they feed)."""
    import ray

    res = ray.cluster_resources()
    cpus = float(res.get("CPU", 0.0))
    if use_gpu:
        # each rank also holds cpus_per_worker CPUs: count only the ranks that can all start
        workers = min(int(res.get("GPU", 0.0)), int(cpus // cpus_per_worker))
    else:
        workers = int(cpus / 2 // cpus_per_worker)
    if workers < 1:
        raise ClusterResourceError(
            f"the cluster cannot hold one training worker ({res.get('GPU', 0)} GPUs, {cpus:g} "
            f"CPUs for train.cpus_per_worker={cpus_per_worker:g}); lower train.cpus_per_worker "
            "or add nodes"
        )
    return workers
