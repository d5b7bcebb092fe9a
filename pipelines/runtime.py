"""Connecting to Ray the same way from every job: a cluster when one is named, else local.

Inside a Ray Job (``radjepa submit``) RAY_ADDRESS is set and we join that cluster. On a laptop we
start a local instance with more logical CPUs than cores: Ray Train workers reserve CPUs that Ray
Data then cannot use, and on a 2-core machine the data pipeline would otherwise starve.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

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


class ClusterError(RuntimeError):
    """The Ray cluster cannot serve the job as asked: the user's to fix, so every entry point
    reports it in one line, without a traceback."""


class ClusterResourceError(ClusterError):
    """The cluster can never provide what the job asks for."""


class ClusterConnectionError(ClusterError):
    """RAY_ADDRESS names no Ray cluster this process can join."""


# How long a named cluster has to answer before we call it unreachable. ray.init has no such
# bound: it retries an address that does not answer for many minutes. A head's GCS answers a
# connection within milliseconds, and ray.init itself warns after 5 s.
CONNECT_TIMEOUT_S = 5.0

_WHAT_TO_CHECK = (
    "check RAY_ADDRESS (HOST:PORT of the head's GCS, 6379 by default, or ray://HOST:10001 for "
    "Ray Client) and that the head node is up, or unset RAY_ADDRESS to run on a local Ray instance"
)


def check_cluster_address(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse within seconds a RAY_ADDRESS that ray.init would give up on only after minutes.

    Given an address where nothing answers (a typo, a head that is down, a port-forward that
    died) or where something other than a Ray head listens, ray.init retries for minutes and then
    fails with a long traceback. Here we dial what ray.init would dial (``auto`` resolved,
    ``localhost`` as the node's IP, the way Ray does), then ask the GCS for its cluster id, as
    ray.init does first: a few milliseconds when the address is right. A GCS that turns away our
    token is told apart, since ray.init reports that only as a failed connection.
    """
    value = address.strip()
    if value.startswith(("http://", "https://")):
        raise ClusterConnectionError(
            f"RAY_ADDRESS={value} is a job server (dashboard) URL, which only `radjepa submit` "
            "and `radjepa jobs` use (set RAY_JOB_ADDRESS for them); to run this command on a "
            "cluster, give its head's GCS address HOST:6379 (or ray://HOST:10001), or unset "
            "RAY_ADDRESS to run on a local Ray instance"
        )
    if value.startswith("ray://"):  # Ray Client: its server is dialled as written
        host_port = _host_port(value)
        if host_port is not None:
            _check_tcp(value, *host_port, timeout_s)
        return
    if "://" in value:  # a client Ray loads by the scheme's module name; it reports its errors
        return
    if value != "auto" and _host_port(value) is None:
        raise ClusterConnectionError(
            f"RAY_ADDRESS={value} is not a Ray cluster address: give HOST:PORT (a head node's "
            "GCS port, 6379 by default), ray://HOST:10001 for Ray Client, or `auto` for the "
            "instance `ray start` runs on this machine; unset it to run on a local Ray instance"
        )
    dialled = _bootstrap_address(value)
    where = value if dialled == value else f"{value} (dialled as {dialled})"
    host_port = _host_port(dialled)
    if host_port is None:  # Ray resolved it to something we cannot read: ray.init decides
        return
    _check_tcp(where, *host_port, timeout_s)
    if value == "auto":
        _token_auth_for_auto()
    _check_gcs(where, dialled, timeout_s)


def _host_port(address: str) -> tuple[str, int] | None:
    try:
        parts = urlsplit(address if "://" in address else f"//{address}")
        port = parts.port
    except ValueError:  # a port that is not a number, or out of range
        return None
    if not parts.hostname or port is None or parts.path or parts.query:
        return None
    return parts.hostname, port


def _bootstrap_address(address: str) -> str:
    """The host:port ray.init connects to for ``address`` (Ray's own resolution)."""
    try:  # Ray-private (pinned 2.60.0): if an upgrade moves it, dial the address as written
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:
        return address

    try:
        resolved = canonicalize_bootstrap_address(address)
    except ConnectionError:  # `auto` and no instance on this machine
        raise ClusterConnectionError(
            "RAY_ADDRESS=auto but no Ray instance runs on this machine: start one with "
            "`ray start --head`, give a cluster's address HOST:PORT, or unset RAY_ADDRESS to "
            "run on a local Ray instance"
        ) from None
    except ValueError:  # an address Ray cannot parse
        raise ClusterConnectionError(
            f"RAY_ADDRESS={address} is not a Ray cluster address; {_WHAT_TO_CHECK}"
        ) from None
    return resolved or address


def _token_auth_for_auto() -> None:
    """Turn token auth on when this machine holds a token, as ray.init does for ``auto`` (never
    for an explicit address): a head that ``ray start`` runs here with token auth is joined by
    ray.init, and asking it without the token was refused as a missing token."""
    try:  # Ray-private (pinned 2.60.0): if an upgrade moves it, the GCS check asks as before
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _check_tcp(where: str, host: str, port: int, timeout_s: float) -> None:
    """Resolve and dial ``host:port`` within ``timeout_s`` in all.

    A socket timeout bounds the connect only: the host name is looked up before it, and a DNS
    server that does not answer held that lookup for the resolver's own timeouts (6 s and more
    observed, 5 s x 2 attempts by glibc's defaults) whatever the bound said.
    """
    deadline = time.monotonic() + timeout_s
    try:
        addresses = _resolve(host, port, timeout_s)
    except TimeoutError:
        why = f"cannot resolve host {host} within {timeout_s:g} s (its DNS server does not answer)"
    except socket.gaierror as err:
        why = f"cannot resolve host {host} ({err.strerror or err})"
    else:
        why = _dial(addresses, port, deadline, timeout_s)
        if why is None:
            return
    raise ClusterConnectionError(
        f"cannot reach the Ray cluster at {where}: {why}; {_WHAT_TO_CHECK}"
    )


def _resolve(host: str, port: int, timeout_s: float) -> list[tuple]:
    """``getaddrinfo`` given up after ``timeout_s`` (``TimeoutError``). The lookup cannot be
    interrupted: it goes on in a daemon thread, which never holds up the process's exit."""
    found: list[tuple] = []
    failed: list[OSError] = []
    done = threading.Event()

    def lookup() -> None:
        try:
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as err:
            failed.append(err)
        finally:
            done.set()

    threading.Thread(target=lookup, name=f"resolve {host}", daemon=True).start()
    if not done.wait(timeout_s):
        raise TimeoutError(f"no answer for {host} within {timeout_s:g} s")
    if failed:
        raise failed[0]
    return found


def _dial(addresses: list[tuple], port: int, deadline: float, timeout_s: float) -> str | None:
    """Connect to the first of ``addresses`` that answers before ``deadline``, as
    ``socket.create_connection`` tries them; None once one does, else why none did."""
    why = f"no answer within {timeout_s:g} s (a host that is down, or a firewall)"
    for family, kind, proto, _, sockaddr in addresses:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(left)
                sock.connect(sockaddr)
                return None
        except ConnectionRefusedError:
            why = f"connection refused, nothing listens on port {port}"
        except TimeoutError:
            why = f"no answer within {timeout_s:g} s (a host that is down, or a firewall)"
        except OSError as err:
            why = err.strerror or str(err)
    return why


def _check_gcs(where: str, target: str, timeout_s: float) -> None:
    """Ask ``target`` for its cluster id, through the channel Ray itself would open (TLS and
    token settings from the environment), to tell a Ray head from any other open port."""
    try:  # Ray-private (pinned 2.60.0): if an upgrade moves them, the TCP check stands alone
        import grpc
        from ray._private.grpc_utils import init_grpc_channel
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:
        log.debug("no GCS check for %s: this Ray version lacks the modules it uses", where)
        return

    channel = init_grpc_channel(target)
    try:
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
            gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s, wait_for_ready=True
        )
        return
    except grpc.RpcError as err:
        code = err.code()
    finally:
        channel.close()
    if code == grpc.StatusCode.UNIMPLEMENTED:
        why = (
            "a gRPC service answers there but it is not a Ray head's GCS (a Ray Client port "
            "needs ray://HOST:PORT)"
        )
    elif code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
        why = (
            f"the port is open but no Ray GCS answered within {timeout_s:g} s (another service "
            "listens there, or the cluster expects TLS: RAY_USE_TLS)"
        )
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        # ray.init retries this for 20 s, then reports a connection that failed
        raise ClusterConnectionError(
            f"the Ray cluster at {where} wants an auth token and ours is missing or wrong: set "
            "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or put it in ~/.ray/auth_token); on the "
            "head, `ray get-auth-token` prints it"
        )
    else:  # a GCS that answers otherwise: ray.init says what it makes of it
        return
    raise ClusterConnectionError(
        f"cannot reach the Ray cluster at {where}: {why}; {_WHAT_TO_CHECK}"
    )


def checked_ray_address() -> str:
    """RAY_ADDRESS as ray.init will read it, refused within seconds when it names a cluster
    this process cannot join (:class:`ClusterConnectionError`); ``""`` or ``local`` for this
    machine.

    :func:`ensure_ray` runs it first; an entry point with slow work of its own before it needs
    Ray (a benchmark's corpus and baseline) runs it up front so as not to pay for that work
    before learning that the address is wrong.
    """
    raw = os.environ.get("RAY_ADDRESS")
    address = (raw or "").strip()
    if raw is not None and raw != address:
        # Ray reads RAY_ADDRESS itself, as written, when given no address or `auto`
        if address:
            os.environ["RAY_ADDRESS"] = address
        else:
            del os.environ["RAY_ADDRESS"]
    if address and address != "local":
        check_cluster_address(address)
    return address


def require_local_ray(why: str) -> None:
    """Refuse a RAY_ADDRESS naming a cluster (:class:`ClusterError`) for an entry point that
    measures this machine: a benchmark's figures are per core of this machine and its files lie
    in this machine's temporary folder, so joining a cluster gives wrong figures or disturbs
    it. ``why`` says what the entry point measures and what a cluster would do to it. An
    address that cannot be joined is refused as :func:`checked_ray_address` refuses it."""
    address = checked_ray_address()
    if address not in ("", "local"):
        raise ClusterError(
            f"{why}; RAY_ADDRESS names the Ray cluster at {address}. Unset RAY_ADDRESS to run "
            "it here."
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
    if address and address != "local":
        log.info("joining Ray cluster at %s", address)
        try:
            ray.init(address=address, log_to_driver=log_to_driver)
        except ConnectionError as err:  # e.g. a Ray Client server that accepts but never serves
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ClusterConnectionError(
                f"cannot join the Ray cluster at {address}: {first}; {_WHAT_TO_CHECK}"
            ) from None
        return
    cores = os.cpu_count() or 1
    num_cpus = local_cpus or max(min_logical_cpus, 2 * cores)
    log.info("starting local Ray with %d logical CPUs on %d cores", num_cpus, cores)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=log_to_driver,
        runtime_env=LOCAL_RUNTIME_ENV,
    )


# Ray Data's Parquet reader (2.60) lists its input through a pool of footer-reading actors that
# it provisions for every execution of a dataset (each epoch of a training run, each
# take_batch) and kills after it: RAY_DATA_PARQUET_FOOTER_NUM_ACTORS of them, 32 by default,
# whatever the number of files. The footers go to those actors in batches of
# RAY_DATA_PARQUET_FOOTER_BATCH_SIZE files (10), one batch per actor in turn, so an actor past
# the number of batches never gets work; it is still a new worker process. On a 2-core laptop
# the 32 start-ups made each pass over a one-shard dataset take 10-25 s instead of 1.6 s.
_FOOTER_ACTORS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
_FOOTER_BATCH = "RAY_DATA_PARQUET_FOOTER_BATCH_SIZE"
_DEFAULT_FOOTER_ACTORS, _DEFAULT_FOOTER_BATCH = 32, 10


def footer_reader_actors(num_files: int) -> int:
    """Footer readers a Parquet read of ``num_files`` files can use: one per batch of files,
    at most Ray's default pool (the one large inputs get, as before)."""
    try:
        batch = max(1, int(os.environ.get(_FOOTER_BATCH, _DEFAULT_FOOTER_BATCH)))
    except ValueError:
        batch = _DEFAULT_FOOTER_BATCH
    return max(1, min(_DEFAULT_FOOTER_ACTORS, -(-num_files // batch)))


# read_parquet sets the variable around one call: calls from two threads of one process must
# not see each other's value, nor restore the other's
_FOOTER_ACTORS_LOCK = threading.Lock()


def read_parquet(
    paths: str | list[str], *, num_files: int, columns: list[str] | None = None, **kwargs: Any
):
    """``ray.data.read_parquet`` with the footer-reader pool sized to ``num_files`` (see
    :func:`footer_reader_actors`); a RAY_DATA_PARQUET_FOOTER_NUM_ACTORS the user set wins.

    Ray reads the variable once, when read_parquet builds the dataset's plan (in this process),
    so it is set for that call only. ``columns`` is applied with ``select_columns``, which Ray
    2.60 pushes down into the scan (``read_parquet(columns=)`` is deprecated there).
    """
    import ray.data

    with _FOOTER_ACTORS_LOCK:
        if _FOOTER_ACTORS in os.environ:
            ds = ray.data.read_parquet(paths, **kwargs)
        else:
            os.environ[_FOOTER_ACTORS] = str(footer_reader_actors(num_files))
            try:
                ds = ray.data.read_parquet(paths, **kwargs)
            finally:
                os.environ.pop(_FOOTER_ACTORS, None)
    return ds.select_columns(columns) if columns is not None else ds


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
            return _first_line(str(cause)) or type(cause).__qualname__
        err = cause  # a Ray error the task re-raised (another task's, an actor's death)
    return _traceback_reason(_ANSI.sub("", getattr(err, "error_msg", None) or str(err)))


def _first_line(message: str) -> str:
    return (message.strip().splitlines() or [""])[0].strip()


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
                found.append((m.group(1), _first_line(m.group(2) or "")))
    for name, message in reversed(found):
        if not name.split("(")[0].endswith(_WRAPPERS):
            return message or name
    return None
