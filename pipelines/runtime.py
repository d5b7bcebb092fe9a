"""Connecting to Ray the same way from every job: a cluster when one is named, else local.

Inside a Ray Job (``radjepa submit``) RAY_ADDRESS is set and we join that cluster. On a laptop we
start a local instance with more logical CPUs than cores: Ray Train workers reserve CPUs that Ray
Data then cannot use, and on a 2-core machine the data pipeline would otherwise starve.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from pipelines.cluster_address import (
    WHAT_TO_CHECK,
    ClusterConnectionError,
    ClusterError,
    checked_ray_address,
    env_names_cluster,
    names_cluster,
)
from radjepa.error_text import error_line, first_line
from radjepa.log_filters import DropPrefix

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
# where a local instance's workers send state API queries: nothing listens on port 0 (refused
# in milliseconds, the failure Ray's callers expect when the state API is down)
NO_STATE_API_URL = "http://127.0.0.1:0"
_CLEANER_QUERY_FAILED = "Failed to query Ray Train Controller actor state"
# a training run's data coordinator says it once per run: advice for Python users (the
# training stream's progress bars are off on purpose, see pipelines.pretrain)
_RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"
_PROGRESS_ADVICE = "Progress bars disabled. To enable, set "


def quiet_local_worker_logs() -> None:
    """Ray worker setup hook of the local instance: drop one warning that would repeat every
    second of every training run and Ray Data's advice to turn the training stream's progress
    bars back on in Python, and have no state API query leave this worker.

    Ray Train starts a placement-group cleaner beside each run that asks the state API once a
    second whether the run's controller is still alive, to free its resources if it crashed.
    The local instance has no dashboard, hence no state API (see :func:`_no_state_api`), so
    each query fails and logs a warning: thousands of lines an hour in the user's terminal. A
    local instance ends with the driver that started it, and the one place a run's controller
    dies before that, a sweep trial Tune stops, is cleaned by the sweep itself
    (``pipelines.placement_groups``). On a cluster the dashboard is up and the hook is not
    installed.
    """
    for name, prefix in (
        (_PG_CLEANER_LOGGER, _CLEANER_QUERY_FAILED),
        (_RAY_DATA_PROGRESS_LOGGER, _PROGRESS_ADVICE),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(DropPrefix(prefix))
    _no_state_api()


def _no_state_api() -> None:
    """Have this worker's state API queries refused at once: the local instance has no state
    API (no dashboard), and a query sent anywhere else asks about this instance's actors a
    server that does not know them. Ray Train's placement-group cleaner, which asks once a
    second whether the run's controller is alive, takes "no such actor" for a dead controller
    and removes the run's placement group, killing its workers. Left to Ray, the query went to
    the dashboard address the GCS records even without a dashboard (127.0.0.1:8265, where a
    `kubectl port-forward` to a cluster's dashboard listens, as docs/CLUSTER.md shows), to a
    shell's RAY_API_SERVER_ADDRESS (`radjepa jobs` reads it), or, with two instances on the
    machine (`radjepa serve` in one terminal, `pretrain` in another), nowhere: Ray raised
    "Found multiple active Ray instances" and the cleaner's thread died in a traceback."""
    os.environ["RAY_API_SERVER_ADDRESS"] = NO_STATE_API_URL


def stop_ray_before_last_word() -> None:
    """Shut this driver's Ray down before an interrupted command says its last line: until
    then Ray's log monitor keeps forwarding the workers' final lines (a step, a progress
    update), which would land after the message the user has to read. Ray Data's threads of
    the interrupted run are given a moment to end first (see :func:`_wait_for_ray_data_threads`)
    and the run's object references are freed before Ray goes (see
    :func:`_shutdown_with_references_freed`)."""
    _wait_for_ray_data_threads()
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            _shutdown_with_references_freed(ray)


class SigtermRouting:
    """The SIGTERM handler :func:`sigterm_as_ctrl_c` installs. ``stopping``: with ``once``, a
    SIGTERM came (routed, or met by ray.init's own handler) and the job is stopping."""

    def __init__(self, once: bool) -> None:
        self.once = once
        self.stopping = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.stopping:
            return
        if self.once:
            self.stop()
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):  # SIG_IGN or SIG_DFL: no Python handler to stand for
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)

    def stop(self) -> None:
        """SIGTERM is ignored from now to the block's end (called from the main thread, in a
        handler or not)."""
        self.stopping = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextmanager
def sigterm_as_ctrl_c(*, once: bool = False) -> Iterator[SigtermRouting]:
    """While the block runs, SIGTERM (``radjepa jobs stop``/``ray job stop``, a pod or a
    systemd unit stopping, ``kill``) does what Ctrl-C does: it calls the SIGINT handler in
    place (Python's raises KeyboardInterrupt; Ray Train's, during ``trainer.fit``, aborts the
    workers gracefully and exits; Tune's, during a sweep, saves the sweep's state and stops the
    trials). ray.init's own handler exits instead (``sys.exit`` from wherever the
    main thread is, mostly inside ``ray.get``/``ray.wait``), after Ray's C++ handler printed a
    stack dump: no last line, an ingest exited 15 and a sweep's driver aborted in interpreter
    teardown (SIGABRT, a core dump), its MLflow runs RUNNING or FAILED.

    ``once``: the first SIGTERM is routed and later ones are ignored until the block ends, so a
    supervisor repeating itself cannot cut short the shutdown the first one started (the run's
    MLflow status, the destination lock's release, Ray's shutdown). Without it a second signal,
    after Tune has put the previous SIGINT handler back, raises KeyboardInterrupt, as a second
    Ctrl-C does.

    The caller's handlers are put back on the way out, however the block ends (returned,
    raised, interrupted by either signal): a notebook or a service calling a job in-process
    keeps its Ctrl-C and its own SIGTERM handling. Left behind were Tune's SIGINT handler after
    a sweep nobody interrupted (a Ctrl-C while the driver wrote the results was swallowed by
    it), ray.init's SIGTERM handler (``sys.exit``) and, after a SIGTERM with ``once``, SIGTERM
    ignored for the rest of the caller's life. A command whose process ends after an
    interruption ignores SIGTERM itself from there (``cli._exit_now``, ``radjepa ingest``).
    Putting the handlers back also sets the kernel's disposition again, which ray.shutdown
    resets to the default behind Python's table. Any other signal's Python handler the block
    changed is put back too: Tune's, for SIGUSR1, stayed after a sweep (a later SIGUSR1 set
    the event of a sweep long over instead of doing what the caller had it do, by default
    ending the process). :func:`ensure_ray` keeps this routing across the ray.init it makes
    inside the block.
    Yields the routing, whose ``stopping`` says whether a SIGTERM came (with ``once``).
    """
    routing = SigtermRouting(once)
    if threading.current_thread() is not threading.main_thread():
        yield routing  # signal handlers can only be set from the main thread
        return
    found = _python_handlers()
    signal.signal(signal.SIGTERM, routing)
    try:
        yield routing
    finally:
        for signum, handler in found.items():
            if handler is None:  # set outside Python: cannot be put back
                continue
            # SIGTERM and SIGINT always: their kernel dispositions may have changed alone
            if signum in (signal.SIGTERM, signal.SIGINT) or signal.getsignal(signum) is not handler:
                signal.signal(signum, handler)


def _python_handlers() -> dict[int, Any]:
    """Each signal's handler in Python's table (None: one set outside Python)."""
    found = {}
    for signum in signal.valid_signals():
        try:
            found[signum] = signal.getsignal(signum)
        except (OSError, ValueError):  # a number the platform lists but Python cannot read
            continue
    return found


def stop_ray_ignoring_sigterm() -> None:
    """:func:`stop_ray_before_last_word` for a command that is stopping (a SIGTERM or Ctrl-C
    ended its run): SIGTERM is ignored from here to the process's end, so that a second one (a
    supervisor or a user repeating it) cannot cut the shutdown short, nor the last line.

    ray.shutdown puts SIGTERM back to its default action (Ray's C++ logging uninstalls its
    crash handlers) right before it stops the local instance's processes, which takes a second
    or so: a SIGTERM then killed the driver (exit -15, no last line). While it runs, a thread
    sets SIGTERM ignored again through libc every 2 ms (Python sets handlers from the main
    thread only, which is inside ray.shutdown); after it, the main thread does. That narrows
    the second to a window right after Ray's reset (about 2 ms; longer when the machine is so
    loaded that the thread waits for a CPU or the GIL), which nothing here can close: Ray
    resets the action from C++ with no hook between that and stopping its processes.

    The reset is ``RayLog::UninstallSignalAction`` (SIGSEGV, SIGILL, SIGFPE, SIGABRT and
    SIGTERM to their defaults) in the core worker's shutdown, a few tenths of a second into
    ray.shutdown; the keeper found it 2.1-3.2 ms after its previous pass in 8 shutdowns at load
    8-14 on 2 cores, but its passes were up to 146 ms apart elsewhere in the same shutdowns. Not
    taken: blocking SIGTERM (Ray's gRPC threads, a dozen, leave it unblocked and would take it),
    RAY_DISABLE_FAILURE_SIGNAL_HANDLER (no reset, but no C++ stack on a native crash either),
    calling that C++ function early through ctypes (a private symbol of one Ray build). The
    keeper is joined before this returns: its last pass, if any, sets what the main thread
    sets next.
    """
    if threading.current_thread() is not threading.main_thread():
        # nothing to keep ignored from here: this thread cannot set Python's handlers, and a
        # libc-level setting would contradict the main thread's
        stop_ray_before_last_word()
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stop = threading.Event()
    keeper = threading.Thread(target=_keep_sigterm_ignored, args=(stop,), daemon=True)
    keeper.start()
    try:
        stop_ray_before_last_word()
    finally:
        stop.set()
        keeper.join()
        # Python's table already says ignored: this sets the process's again
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def exit_after_interruption(code: int, say: Callable[[], None]) -> NoReturn:
    """End a command whose run an interruption stopped and has recorded: Ray shut down with
    SIGTERM ignored, ``say()`` the last line, logs and streams flushed, and the interpreter's
    teardown skipped. A SIGTERM that landed in ``ray.get`` (a pod shut down, ``kill``) left the
    process to abort in that teardown (SIGABRT: exit 134 and a core dump, after the last line)
    even after ``ray.shutdown()``."""
    stop_ray_ignoring_sigterm()
    say()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# the threads Ray Data (2.60) runs a dataset's execution on, and a driver-side iteration's
# pipeline (``iter_batches``) on: both end on their own once the run is interrupted
_RAY_DATA_THREADS = ("StreamingExecutor-", "iter_threaded")


def _wait_for_ray_data_threads(timeout_s: float = 10.0) -> None:
    """Wait, ``timeout_s`` at most, for the threads of interrupted Ray Data executions and
    iterations to end. Closing an execution waits 2 s for its thread; on a loaded machine the
    thread ran on, and touched Ray's core worker after ray.shutdown, which then ended the
    process at once (exit 1, no last line, Ray's agents orphaned): 2 runs in 5 of an
    interrupted ingest at load 18. An iteration's pipeline thread ends once it sees the
    consumer gone, freeing the object references it held: on Ray's side of the shutdown."""
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread.name.startswith(_RAY_DATA_THREADS) and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


def _shutdown_with_references_freed(ray: Any) -> None:
    """ray.shutdown with no object reference freed behind its back. A reference freed on
    another thread while ray.shutdown tears the core worker down ends the process at once
    ("The core worker has already been shutdown ... The process will exit": exit 1, no last
    line; an interrupted ingest did so about once in twelve runs on a loaded machine). An
    interrupted iteration leaves its references in reference cycles (generators, their frames,
    the exception), which whichever thread next runs Python's cyclic collector frees: so they
    are collected here, on the main thread while Ray is up, and the automatic collector is
    paused until Ray is down (an explicit ``gc.collect`` still runs)."""
    gc.collect()
    was_enabled = gc.isenabled()
    try:  # disabled inside: a Ctrl-C right after it still finds the finally
        gc.disable()
        ray.shutdown()
    finally:
        if was_enabled:
            gc.enable()


def _keep_sigterm_ignored(stop: threading.Event, every_s: float = 0.002) -> None:
    """Set SIGTERM's action to ignore, through libc (any thread may), until ``stop`` is set."""
    try:
        libc = ctypes.CDLL(None)
        libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.signal.restype = ctypes.c_void_p
    except (OSError, AttributeError):  # no C library to call: the main thread's setting stands
        return
    while not stop.is_set():
        libc.signal(int(signal.SIGTERM), int(signal.SIG_IGN))
        stop.wait(every_s)


def _routed_sigterm() -> SigtermRouting | None:
    """The :func:`sigterm_as_ctrl_c` handler in place, or None (also off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    handler = signal.getsignal(signal.SIGTERM)
    return handler if isinstance(handler, SigtermRouting) else None


@contextmanager
def _keep_sigterm_routing() -> Iterator[None]:
    """Around ray.init: put a :func:`sigterm_as_ctrl_c` routing back once ray.init has set its
    own SIGTERM handlers (``sys.exit``, and in C++ a stack dump that Python's handler, set
    again, replaces). A SIGTERM while ray.init runs meets Ray's handler, whose SystemExit is
    then the KeyboardInterrupt the routing would have raised, and with ``once`` the first: later
    SIGTERMs are ignored (set back to ignored, not to the routing, on the way out)."""
    routed = _routed_sigterm()
    if routed is None:
        yield
        return
    try:
        yield
    except SystemExit as err:
        if err.code != signal.SIGTERM:
            raise
        if routed.once:
            routed.stop()
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN if routed.stopping else routed)


# Set by declare_process_ends_with_job(): this process ends when the job it runs does (the
# console script, ``python -m pipelines.cli|ingest|pretrain``, a Ray Job's entry point); never
# for a caller that runs a job in-process (a notebook, a service, Click's CliRunner)
_process_ends_with_job = False


def declare_process_ends_with_job() -> None:
    """Called by an entry point, before its job: this process ends with the job (see
    :func:`ignore_sigterm_after_the_job`). One switch for every entry point, so that the
    console script and the Ray Job entry points cannot drift apart on it."""
    global _process_ends_with_job
    _process_ends_with_job = True


def process_ends_with_job() -> bool:
    """Whether an entry point said this process ends with its job
    (:func:`declare_process_ends_with_job`): it may then exit at once after an interruption
    (:func:`exit_after_interruption`); an in-process caller gets an exception instead."""
    return _process_ends_with_job


def ignore_sigterm_after_the_job() -> None:
    """When this process ends with the job it is about to run, SIGTERM is ignored after the
    job. Set just before it, so that the job's SIGTERM routing (:func:`sigterm_as_ctrl_c`),
    which puts back the handler it found, puts this one back: set after the job instead, a
    second SIGTERM (a supervisor repeating itself) in between still ended the process (exit
    -15) before its last line, and Ray's shutdown half done. An in-process caller keeps its own
    handler."""
    if _process_ends_with_job:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


class ClusterResourceError(ClusterError):
    """The cluster can never provide what the job asks for."""


class RayStartTimeout(Exception):
    """A local Ray instance did not come up within Ray's start-up wait: the machine was too
    busy (exit 1, one line: nothing the user typed was wrong, and a retry may succeed)."""


# How ray.init (Ray 2.60) says that the local instance it started did not come up in time,
# each raised from its wait for one step of the start-up: the GCS server writes its port to a
# file (a RuntimeError from _raylet's wait_for_persisted_port, after
# RAY_gcs_server_port_wait_time_s, 30 s by default), then the raylet registers with the GCS
# (a bare Exception from ray._private.node.Node.__init__, after a fixed 30 s)
_GCS_PORT_WAIT = "RAY_gcs_server_port_wait_time_s"
# (class, how the message starts, what it holds, the step to name)
_START_TIMEOUTS = (
    (
        RuntimeError,
        "Timed out waiting for file ",
        "/gcs_server_port_",
        "its GCS server did not start",
    ),
    (Exception, "The current node timed out during startup", "", "its raylet did not register"),
)


def start_timeout_message(err: BaseException) -> str | None:
    """The one line to say for ``err`` when it is ray.init's start-up timeout, else None.

    Matched by exact class and message: the raylet's timeout is a bare ``Exception``, so a
    subclass (any other failure of ray.init) is never taken for it."""
    text = str(err)
    steps = [
        step
        for cls, prefix, names, step in _START_TIMEOUTS
        if type(err) is cls and text.startswith(prefix) and names in text
    ]
    if not steps:
        return None
    wait_s = os.environ.get(_GCS_PORT_WAIT, "30") if type(err) is RuntimeError else "30"
    return (
        f"could not start a local Ray: this machine was too busy to bring it up within "
        f"{wait_s} s ({steps[0]} in time); retry when it is less loaded, or start Ray once with "
        "`ray start --head` and run with RAY_ADDRESS=auto"
    )


def ensure_ray(
    min_logical_cpus: int = 4, *, local_cpus: int | None = None, log_to_driver: bool = True
) -> None:
    """Initialise Ray once per process (idempotent).

    A cluster named by RAY_ADDRESS is checked before ray.init (:func:`checked_ray_address`),
    which would otherwise spend minutes on an address that does not answer. ``local`` means this
    machine, as an unset RAY_ADDRESS does, so it gets the local instance's settings below.
    ``local_cpus`` pins the local instance's logical CPUs (a benchmark divides by the cores it
    ran on) and ``log_to_driver=False`` keeps workers' output off a driver whose stdout is its
    result; a cluster's size is its own.
    """
    import ray

    if ray.is_initialized():
        return
    address = checked_ray_address()
    if names_cluster(address):
        log.info("joining Ray cluster at %s", address)
        try:
            with _keep_sigterm_routing():
                ray.init(address=address, log_to_driver=log_to_driver)
        except ConnectionError as err:  # e.g. a Ray Client server that accepts but never serves
            first = error_line(err)
            raise ClusterConnectionError(
                f"cannot join the Ray cluster at {address}: {first}; {WHAT_TO_CHECK}"
            ) from None
        return
    cores = os.cpu_count() or 1
    num_cpus = local_cpus or max(min_logical_cpus, 2 * cores)
    log.info("starting local Ray with %d logical CPUs on %d cores", num_cpus, cores)
    # address="local": without it ray.init joins the cluster the last `ray start` on this
    # machine recorded (and refuses num_cpus for it), so an unset RAY_ADDRESS, documented as
    # "a local instance of this process's own", failed or landed on somebody's cluster
    try:
        with _keep_sigterm_routing():
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                configure_logging=False,
                log_to_driver=log_to_driver,
                runtime_env=LOCAL_RUNTIME_ENV,
            )
    except Exception as err:  # noqa: BLE001 - one of Ray's timeouts is a bare Exception
        message = start_timeout_message(err)
        if message is None:
            raise
        # the processes it did start end with this one (ray.init's reaper watches it)
        raise RayStartTimeout(message) from None


def cluster_has_gpus() -> bool:
    """Whether the connected cluster advertises any GPU (never request one that is absent)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0)) > 0.0


def resolve_use_gpu(setting: str, key: str = "train.use_gpu") -> bool:
    """Map a config's ``use_gpu`` ('auto'|'true'|'false') onto the cluster in hand.

    ``true`` with no GPU: a Ray this process started never grows, so the job would wait forever
    (refused); a cluster's GPU group may autoscale from zero or still be starting its pods (a
    RayService deploys once its head is up), so there the job waits for one, with a warning.
    ``auto`` takes what the cluster has now and says so on a cluster when that is no GPU: a GPU
    group at zero is not seen, and the job ran on CPU without a word.
    """
    if setting == "false":
        return False
    if cluster_has_gpus():
        return True
    if setting == "true":
        # a Ray task or actor (Serve's build of a config's app, a sweep trial) cannot know who
        # started its Ray, and gets no RAY_ADDRESS: the driver that could refuse did
        if not (env_names_cluster() or in_ray_worker()):
            raise ClusterResourceError(
                f"{key}=true but this local Ray instance has no GPUs: the job would wait "
                f"forever. Use --set {key}=auto or run on a cluster with GPU workers."
            )
        _warn_once(
            f"{key}=true and the cluster has no GPU yet: the job waits until a GPU node joins "
            "(an autoscaled GPU group, pods still starting)"
        )
        return True
    if env_names_cluster():
        _warn_once(
            f"{key}=auto and the cluster has no GPU now: running on CPU (a GPU group that "
            f"autoscales from zero is not counted: --set {key}=true waits for it)"
        )
    return False


_WARNED: set[str] = set()


def in_ray_worker() -> bool:
    """Whether this process is a Ray worker (a task's or an actor's), not a driver."""
    import ray

    if not ray.is_initialized():
        return False
    worker = getattr(ray.get_runtime_context(), "worker", None)
    return worker is not None and worker.mode == ray.WORKER_MODE


def _warn_once(message: str) -> None:
    """A warning the job's entry points would otherwise each repeat (a pretrain resolves
    ``use_gpu`` for its worker count, then for its trainer)."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


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


def check_trial_fits_locally(workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    """On a local instance, refuse a sweep trial the whole instance cannot hold.

    On a cluster an autoscaler may add the nodes a trial waits for, so :func:`max_parallel_trials`
    only warns. A local instance never grows: Ray Train's controller timed out starting the
    ranks every 60 s and tried again, forever, printing a traceback each time. Besides its
    ranks a trial needs a CPU for Ray Data to read its shards and a quarter CPU for its Tune
    driver; with less the ranks start and then wait for data forever.
    """
    import ray

    if env_names_cluster():
        return
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0.0)), int(res.get("GPU", 0.0))
    ranks = workers * cpus_per_worker
    if cpus >= ranks + 1.25 and (not use_gpu or gpus >= workers):
        return
    gpu_need = f"{workers} GPU(s), " if use_gpu else ""
    raise ClusterResourceError(
        f"one sweep trial needs {gpu_need}{ranks:g} CPUs for train.num_workers={workers} x "
        f"train.cpus_per_worker={cpus_per_worker:g} and 1.25 more for its data and driver, but "
        f"this local Ray instance has {gpus} GPUs and {cpus:g} CPUs and cannot grow: lower "
        "train.num_workers or train.cpus_per_worker, or run on a cluster"
    )


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
        if use_gpu and not res.get("GPU") and env_names_cluster():
            raise ClusterResourceError(
                "train.num_workers=0 counts the cluster's GPUs, and it has none yet (a GPU "
                "group autoscaled from zero): set train.num_workers to the ranks to wait for"
            )
        raise ClusterResourceError(
            f"the cluster cannot hold one training worker ({res.get('GPU', 0)} GPUs, {cpus:g} "
            f"CPUs for train.cpus_per_worker={cpus_per_worker:g}); lower train.cpus_per_worker "
            "or add nodes"
        )
    return workers


# the line that closes a traceback: the exception's class, of any name (module-qualified, a
# local class's <locals> included; Ray's wrappers read RayTaskError(Cause)), and its message
# when it has one
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.<>]*(?:\([\w.<>]*\))?)(?:: (.*))?$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# where a traceback starts: Python's header, or Ray's, which names the worker process instead
_TRACEBACK_HEADER = re.compile(r"^Traceback \(most recent call last\):|ray::\S*\(\) \(pid=\d+")
# Ray's wrappers of user code, whose own message ("UDF failed to process a data block.") is not
# the reason: the exception they were raised from is
_WRAPPERS = ("UserCodeException", "RayTaskError")


def remote_error_message(err: BaseException) -> str | None:
    """The message of the exception that ended a Ray worker, from the error Ray passes on.

    A job that wants to say the worker's one-line reason (a model another node cannot read)
    needs it without the worker's whole traceback. A task's error (``RayTaskError``) carries the
    worker's exception object, whose message is read as is. An actor whose ``__init__`` raises
    reaches the driver as an ``ActorDiedError`` holding only the worker's traceback as text (Ray
    keeps no exception object there), so the line that closes that traceback is read, whatever
    the exception's class is called. None when there is neither.
    """
    from ray.exceptions import RayError, RayTaskError, UserCodeException

    while isinstance(err, RayTaskError):
        cause = err.cause
        if isinstance(cause, UserCodeException):
            # Ray Data's wrapper, raised from the real exception: that link does not survive
            # pickling, the worker's traceback (both exceptions) does
            return _traceback_reason(_ANSI.sub("", str(err)))
        if type(cause) is RayError:  # Ray's stand-in for an exception it could not pickle
            return _traceback_reason(_ANSI.sub("", str(cause)))
        if not isinstance(cause, RayError):
            return first_line(str(cause)) or type(cause).__qualname__
        err = cause  # a Ray error the task re-raised (another task's, an actor's death)
    return _traceback_reason(_ANSI.sub("", getattr(err, "error_msg", None) or str(err)))


def rank_failure(err: BaseException) -> str:
    """``Class: message`` in one line for the exception a Train rank failed with. Ray's task
    error (a rank's read of the training stream failed in a Ray Data task) is said as the
    exception it carries: its own text is the task's traceback, whose first line named an
    actor, not the cause."""
    from ray.exceptions import RayError, RayTaskError

    if isinstance(err, RayTaskError):
        cause: BaseException | None = err
        while isinstance(cause, RayTaskError):  # a task's error another task re-raised
            cause = getattr(cause, "cause", None)
        # Ray's own classes (a UDF's wrapper, its stand-in for what it could not pickle)
        # name nothing the user knows: the remote message then says the class itself
        named = cause is not None and not isinstance(cause, RayError)
        name = type(cause).__name__ if named else ""
        text = remote_error_message(err) or ""
        if not name:
            return text or type(err).__name__
    else:
        name, text = type(err).__name__, first_line(str(err))
    return f"{name}: {text}" if text else name


def _traceback_reason(text: str) -> str | None:
    """The exception line closing the last traceback in ``text`` (a Python traceback, or Ray's
    rendering of one, whose header names the worker instead of "Traceback" and which may leave
    out every frame): the first line at column 0 after a header and its frames. Ray's wrappers
    are passed over for what they wrap."""
    found: list[tuple[str, str]] = []
    in_frames = False
    for line in text.splitlines():
        if line.startswith("  File ") or _TRACEBACK_HEADER.search(line):
            in_frames = True
        elif in_frames and not line.startswith(" "):  # frames and their source are indented
            in_frames = False
            m = _EXCEPTION_LINE.match(line.strip())
            if m:
                found.append((m.group(1), first_line(m.group(2) or "")))
    for name, message in reversed(found):
        if not name.split("(")[0].endswith(_WRAPPERS):
            return message or name
    return None
