"""``radjepa serve``: the same two deployments, started in-process on a local Ray.

Kept apart from the CLI so the foreground loop and the Ray Serve start/stop are plain
functions; ``build_app`` remains the entry point for ``serve deploy`` and RayService.

With RAY_ADDRESS naming a cluster, the cluster's Serve is shared: its other applications (and
a production ``radjepa`` a RayService runs) are not this command's to replace or stop, so a
start refuses a running application of our name and a stop deletes only the one it deployed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from radjepa.config import Config
from radjepa.error_text import error_line, first_line
from radjepa.log_filters import lines_dropped
from serve.security import ApiSettings, SecurityConfigError, settings_from_config

__all__ = [
    "APP_NAME",
    "STOP_BUDGET_S",
    "AppAlreadyRunning",
    "PortInUse",
    "ServeStartFailed",
    "base_url",
    "check_port_free",
    "refuse_keyless_on_cluster",
    "remote_cluster",
    "start_failures_said_once",
    "start_local",
    "stop_local",
    "curl_example",
]

if TYPE_CHECKING:
    from ray.serve import Application

log = logging.getLogger(__name__)

APP_NAME = "radjepa"

# Whether this process deployed APP_NAME (set just before serve.run, so a start that failed
# half-way is removed too): a stop on a cluster deletes only an application it deployed, never
# one of the same name that ran there before (a start refused by AppAlreadyRunning still goes
# through the caller's stop).
_deployed_here = False
# Whether this process started Serve (its controller and proxies) on the cluster it joined: a
# stop then shuts Serve down once no other application runs there. Left running, a `ray start`
# instance (RAY_ADDRESS=auto) kept the first run's proxies, on its port, and the next run's
# serve.start ignored its own host and port (Serve warns and keeps the old ones).
_serve_started_here = False


class AppAlreadyRunning(RuntimeError):
    """The cluster RAY_ADDRESS names already runs a Serve application named APP_NAME: never
    replaced (serve.run would replace it in silence), said in one line."""


class PortInUse(RuntimeError):
    """The HTTP port is taken: said before Ray starts, in one line."""


class ServeStartFailed(RuntimeError):
    """A deployment's replicas could not start (found only there: an index whose pages are
    damaged, a model the replicas cannot fetch or read); the message is one line naming the
    deployment and the replica's own error."""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port_free(host: str, port: int) -> None:
    """Raise PortInUse when ``host:port`` cannot be bound (0 = any free port: always fine).

    Without this, Ray Serve's proxy fails to bind inside its actor, retries, and the user gets
    about 150 lines of proxy tracebacks and exit code 1 some 50 s later. The probe binds as the
    proxy does (same address family, no SO_REUSEADDR), so it refuses exactly what the proxy
    would refuse.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise PortInUse(
                f"cannot listen on {host}:{port}: {err.strerror or err}; stop what holds the "
                "port or choose another with --port (0: any free port)"
            ) from None


def remote_cluster() -> bool:
    """Whether RAY_ADDRESS names a cluster of other machines: not ``auto`` nor a loopback
    address (this machine's own `ray start`, which the README suggests for a laptop)."""
    from pipelines.cluster_address import env_names_cluster

    if not env_names_cluster():
        return False
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address == "auto":
        return False
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return not (host == "localhost" or _is_loopback(host))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refuse_keyless_on_cluster(settings: ApiSettings, *, on_cluster: bool) -> None:
    """Refuse keyless (insecure local) mode on a cluster of other machines
    (SecurityConfigError; ``on_cluster``: :func:`remote_cluster`).

    Keyless mode is allowed only on a loopback host, a promise the proxies' http_options keep.
    On a cluster whose Serve already runs, serve.start's http_options are ignored: its proxies
    listen where they were started (0.0.0.0 under a RayService), so the keyless API would
    answer every machine that reaches them. This machine's own `ray start` is checked once
    joined (:func:`start_local`: the host its running Serve listens on)."""
    if on_cluster and settings.insecure_local and not settings.key_digests:
        raise SecurityConfigError(
            "insecure local mode (no API keys) is refused on a Ray cluster (RAY_ADDRESS names "
            "one): its Serve proxies may listen on every interface whatever serve.host says; "
            "configure API keys, or unset RAY_ADDRESS to serve keyless on this machine"
        )


def _refuse_running_app(address: str) -> None:
    """Raise AppAlreadyRunning when the cluster's Serve holds an application named APP_NAME
    (a production one a RayService runs, or a colleague's `radjepa serve`)."""
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return
    state = str(app.status).rsplit(".", 1)[-1]
    raise AppAlreadyRunning(
        f"the Ray cluster at {address} already runs a Serve application named {APP_NAME!r} "
        f"({state}), which `radjepa serve` does not replace; if it is truly yours to remove, "
        f"run `serve delete {APP_NAME} --address http://HEAD:8265` (a RayService recreates its "
        "own), then start again"
    )


def _deploy(app: Application) -> None:
    """serve.run of APP_NAME, remembered as this process's own for :func:`stop_local`."""
    global _deployed_here
    from ray import serve

    _deployed_here = True
    serve.run(app, name=APP_NAME, route_prefix="/")


def start_local(
    cfg: Config,
    *,
    replica_env: dict[str, str] | None = None,
    settings: ApiSettings | None = None,
    references_checked: bool = False,
    key_checked: bool = False,
    start_attempts: int | None = None,
    pinned: tuple[str, str | None] | None = None,
) -> str:
    """Deploy the API on the connected Ray and return its base URL (port 0 = any free port).

    Raises SecurityConfigError before anything starts when no API key is configured and
    insecure local mode was not asked for (or was, on a cluster), PortInUse when the port is
    taken, and AppAlreadyRunning when a cluster RAY_ADDRESS names already runs APP_NAME.
    ``replica_env``: env vars for the ingress replicas (``app_from_config``). ``settings``:
    those a caller already built from ``cfg.serve`` (the keys file is then read, and its
    warnings logged, once). ``references_checked``: the caller ran
    ``serve.deployment.check_references`` before starting Ray (``app_from_config``), and
    ``key_checked`` ``serve.deployment.check_pseudonym_key`` for this local Ray; ``pinned``:
    the references it pinned and checked (``serve.deployment.pin_and_check``).
    ``start_attempts``: replica start-ups a deployment may fail before Serve gives it up
    (``app_from_config``). Raises ServeStartFailed when a deployment's replicas do not start.
    """
    from ray import serve

    from pipelines.cluster_address import env_names_cluster
    from serve.deployment import app_from_config

    settings = settings or settings_from_config(
        cfg.serve,
        secret_env=cfg.ingest.secret_env,
        allow_development_key=cfg.ingest.allow_development_key,
    )
    global _serve_started_here
    on_cluster = env_names_cluster()
    refuse_keyless_on_cluster(settings, on_cluster=remote_cluster())
    running = _running_serve() if on_cluster else None
    if running is not None:
        _refuse_running_app(os.environ.get("RAY_ADDRESS", "").strip())
        host, port = _listening(running, settings, cfg.serve.host, cfg.serve.port)
    else:
        check_port_free(cfg.serve.host, cfg.serve.port)
        host, port = cfg.serve.host, cfg.serve.port or _free_port(cfg.serve.host)
        serve.start(
            http_options={
                "host": host,
                "port": port,
                "request_timeout_s": cfg.serve.request_timeout_s + 5.0,
            }
        )
        _serve_started_here = on_cluster
    app = app_from_config(
        cfg,
        settings=settings,
        replica_env=replica_env,
        references_checked=references_checked,
        pinned=pinned,
        key_checked=key_checked,
        start_attempts=start_attempts,
    )
    try:
        # serve.run connects to the instance serve.start just made with these http_options and
        # says that "new http_options ... will not be applied": there are none; dropped
        with lines_dropped("ray.serve", "Connecting to existing Serve app"):
            _deploy(app)
    except RuntimeError as err:  # "Deploying application radjepa failed: ..." (no cause named)
        raise ServeStartFailed(_failed_start(err)) from None
    return base_url(host, port)


def _running_serve() -> Any | None:
    """The client of the Serve controller running on the cluster this process joined; None
    when Serve does not run there."""
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False)


def _listening(client: Any, settings: ApiSettings, host: str, port: int) -> tuple[str, int]:
    """Where an already running Serve's proxies listen (its host and port, not ours: Serve
    ignores another serve.start's), refusing keyless mode when that is not loopback."""
    http = client.http_config
    if (
        settings.insecure_local
        and not settings.key_digests
        and not (http.host == "localhost" or _is_loopback(http.host))
    ):
        raise SecurityConfigError(
            f"insecure local mode (no API keys) is refused: Ray Serve already runs on this Ray "
            f"with its proxies on {http.host}:{http.port}, not a loopback address; configure "
            "API keys, or stop that Serve first"
        )
    if (http.host, http.port) != (host, port or http.port):
        log.warning(
            "Ray Serve already runs on this Ray, listening on %s:%d: serve.host/serve.port "
            "(%s:%d) are not applied",
            http.host,
            http.port,
            host,
            port,
        )
    return str(http.host), int(http.port)


def base_url(host: str, port: int) -> str:
    """``http://HOST:PORT``, an IPv6 literal in brackets (``http://::1:8000`` is no URL)."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}"


def _failed_start(err: RuntimeError) -> str:
    """One line for a deployment that did not start: which deployment, and its replica's own
    error (:mod:`serve.startup`), read from Serve's status of the application. The whole
    status message (the replica's traceback) is logged at DEBUG; the Serve controller's log
    (``logs/serve/controller_*.log`` in the Ray session folder) holds it too."""
    from ray import serve

    from serve.startup import startup_message

    said = error_line(err)
    try:
        app = serve.status().applications.get(APP_NAME)
    except Exception as status_err:  # noqa: BLE001 - Ray's own words are the fallback
        log.debug("Serve's status could not be read: %r", status_err)
        return said
    if app is None:
        return said
    failed = []
    for name, deployment in app.deployments.items():
        if str(deployment.status).rsplit(".", 1)[-1] not in ("DEPLOY_FAILED", "UNHEALTHY"):
            continue
        log.debug("deployment %s: %s", name, deployment.message)
        own = startup_message(deployment.message)
        if own is None:  # not our replicas' error (killed, out of memory, Serve's own)
            lines = [x.strip() for x in (deployment.message or "").splitlines() if x.strip()]
            own = lines[-1][:500] if lines else "no reason given"
        failed.append(f"the {name} deployment failed to start: {own}")
    return "; ".join(failed) or said


# "(ServeController pid=123) ERROR 2026-12-05 14:25:53,908 controller 123 -- ...": one log
# record of the controller forwarded to this process's stderr, each line so prefixed
_FORWARDED = re.compile(r"^\(ServeController pid=\d+(?:, ip=[^)]*)?\) ?(.*)$")
_RECORD = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \d{4}-\d\d-\d\d ")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _WithoutStartTracebacks:
    """A text stream passing everything on but the Serve controller's records of a replica
    that failed to start ("Exception in Replica(...)" and the traceback under it, forwarded
    line by line to the driver's stderr): the driver says each failure in one line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.active = True
        self._partial = ""
        self._hiding = False

    def write(self, text: str) -> int:
        if not self.active and not self._partial:  # the application runs: as it comes
            return self.stream.write(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if self._keep(line):
                self.stream.write(line + "\n")
        return len(text)

    def _keep(self, line: str) -> bool:
        forwarded = _FORWARDED.match(_ANSI.sub("", line))
        if not self.active or forwarded is None:
            return True
        body = forwarded.group(1)
        if _RECORD.match(body):  # a new record: the end of the one hidden
            self._hiding = "Exception in Replica(" in body
        return not self._hiding

    def flush(self) -> None:
        if self._partial:
            self.stream.write(self._partial)
            self._partial = ""
        self.stream.flush()

    def __getattr__(self, name: str):  # encoding, isatty, fileno, ...
        return getattr(self.stream, name)


@contextmanager
def start_failures_said_once() -> Iterator[_WithoutStartTracebacks]:
    """While inside, the Serve controller's traceback of each replica that fails to start is
    kept off this process's stderr (Ray forwards it there: ~50 lines a replica, ~230 in all);
    ServeStartFailed says the failure in one line instead. The traceback stays in the
    controller's log. Set ``.active = False`` once the application runs: a replica failing
    later (a new one the autoscaler adds) is then said by the controller as before. Lines
    forwarded after the failure, while Ray stops, are still filtered, hence a context
    spanning the stop rather than ``serve.run`` alone."""
    stream = _WithoutStartTracebacks(sys.stderr)
    sys.stderr = stream  # type: ignore[assignment]
    try:
        yield stream
    finally:
        if sys.stderr is stream:
            sys.stderr = stream.stream
        stream.flush()


# `radjepa serve` stops within STOP_BUDGET_S of Ctrl-C or SIGTERM, under a Kubernetes pod's
# default 30 s grace (its SIGKILL came mid-shutdown): Serve gets SERVE_STOP_TIMEOUT_S, Ray's
# own stop of the local instance the rest (SIGTERM, then SIGKILL after 1 s, per process;
# 2-3 s measured on a loaded 2-core box). Left to itself serve.shutdown waits 5 s for the
# controller to answer, then 30 s for its graceful shutdown, which waits up to each replica's
# graceful_shutdown_timeout_s (20 s) for requests whose callers the proxies it killed first
# have already cut off: 42 s from Ctrl-C to exit on the loaded box.
STOP_BUDGET_S = 20.0
SERVE_STOP_TIMEOUT_S = 10.0


def stop_local(timeout_s: float = SERVE_STOP_TIMEOUT_S, *, on_cluster: bool | None = None) -> bool:
    """Stop what :func:`start_local` started, waiting ``timeout_s`` at most; returns whether it
    finished.

    On this process's own Ray, Serve is shut down whole. On a cluster (``on_cluster``; None:
    RAY_ADDRESS names one) only the application this process deployed is deleted: Serve's
    shutdown would delete every application of the cluster and stop Serve's own actors there,
    and an application of our name that ran before this process is not ours to delete.

    Past the wait the controller goes on removing the application by itself (it was told to
    first), and a local Ray's ``ray.shutdown`` then stops whatever is left. Serve's async
    shutdown is awaited so the wait can be cut: abandoning the blocking one in a thread would
    leave that thread inside Ray's core worker while ray.shutdown destroys it.

    Never raises an error (an interruption still goes through): the caller's stop goes on to
    Ray's shutdown and its last line whatever Serve's meets. An error here skipped
    ``radjepa serve``'s ``stopped`` and ended it in a traceback; it is said in one line.

    Never starts anything: with Ray down in this process (``ray.shutdown`` already ran, or Ray
    was never started) there is nothing it can stop, and it returns True. Serve's shutdown
    calls ``ray.init`` when Ray is not initialised: a stop then started a local Ray instance
    of Ray's defaults (a dashboard, every core; 40 s on a loaded box), or joined the cluster a
    ``ray start`` on this machine had left, to find no Serve there.
    """
    import ray

    from pipelines.cluster_address import env_names_cluster

    if not ray.is_initialized():
        log.info("Ray is not running in this process: no Ray Serve to shut down")
        return True
    if on_cluster is None:
        on_cluster = env_names_cluster()
    if on_cluster:
        started = time.monotonic()
        deleted = _delete_own_app(timeout_s)
        return deleted and _shutdown_if_ours(timeout_s - (time.monotonic() - started))
    global _deployed_here
    _deployed_here = False  # Serve goes whole, the application with it
    return _shutdown_serve(timeout_s)


def _said(err: BaseException) -> str:
    first = first_line(str(err))
    return f"{type(err).__name__}{f': {first}' if first else ''}"


def _shutdown_serve(timeout_s: float) -> bool:
    """Serve's whole shutdown, bounded (this process's own Ray: nothing else uses it)."""
    from ray import serve

    async def bounded() -> None:
        await asyncio.wait_for(serve.shutdown_async(), timeout_s)

    shutdown = bounded()
    try:
        asyncio.run(shutdown)
    except TimeoutError:
        log.warning("Ray Serve did not shut down within %g s; stopping it with Ray", timeout_s)
        return False
    except Exception as err:  # noqa: BLE001 - a stop: Ray's shutdown ends what is left
        shutdown.close()  # not started when asyncio.run refused it: no "never awaited" warning
        log.warning("Ray Serve's shutdown failed (%s); stopping it with Ray", _said(err))
        return False
    return True


# how often a stop on a cluster asks whether its application is gone
_DELETE_POLL_S = 0.2


def _delete_own_app(timeout_s: float) -> bool:
    """Delete APP_NAME from a cluster's Serve when this process deployed it, and wait
    ``timeout_s`` at most for the controller to say it is gone (past that, the controller goes
    on removing it by itself). Serve's delete has no async form, and its blocking one waits up
    to 60 s: the request is sent without waiting and the application's status polled."""
    global _deployed_here
    from ray import serve

    if not _deployed_here:
        log.info("no Serve application of this process on the cluster: nothing to delete")
        return True
    deadline = time.monotonic() + timeout_s
    try:
        serve.delete(APP_NAME, _blocking=False)
        _deployed_here = False  # asked: the controller removes it even if we stop waiting
        while APP_NAME in serve.status().applications:
            if time.monotonic() >= deadline:
                log.warning(
                    "Serve application %s was not removed within %g s; the cluster's Serve "
                    "controller goes on removing it",
                    APP_NAME,
                    timeout_s,
                )
                return False
            time.sleep(_DELETE_POLL_S)
    except Exception as err:  # noqa: BLE001 - a stop: said, and the disconnect goes on
        log.warning("deleting Serve application %s failed (%s)", APP_NAME, _said(err))
        return False
    return True


def _shutdown_if_ours(timeout_s: float) -> bool:
    """Shut Serve down when this process started it and no application is left on it: a
    Serve left behind on a `ray start` instance (RAY_ADDRESS=auto) kept its proxies and port,
    and the next `radjepa serve` or demo found its own host and port ignored."""
    global _serve_started_here
    from ray import serve

    if not _serve_started_here:
        return True
    try:
        others = sorted(serve.status().applications)
    except Exception as err:  # noqa: BLE001 - a stop: said, and the disconnect goes on
        log.warning("cannot tell whether Ray Serve runs other applications (%s)", _said(err))
        return False
    if others:
        log.info("Ray Serve is left running for its other applications: %s", ", ".join(others))
        return True
    _serve_started_here = False
    return _shutdown_serve(max(timeout_s, 1.0))


def curl_example(url: str, settings: ApiSettings) -> str:
    """The curl line ``radjepa serve`` prints: an ``Authorization`` header with a placeholder
    whenever keys are configured (also with ``--insecure-local``, which then changes nothing).

    Never a key, nor a shell expansion of one: keys may come from the keys file, from a
    variable of another name (``serve.api_keys_env``), and an entry may carry scopes
    (``KEY patient_linkage``), so no expansion of one variable names a key that works."""
    auth = '-H "Authorization: Bearer <your API key>" ' if settings.key_digests else ""
    return (
        f"curl -s {auth}-H 'Content-Type: application/dicom' "
        f"--data-binary @image.dcm {url}/v1/embed"
    )
