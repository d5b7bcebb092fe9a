"""Whether RAY_ADDRESS names a Ray cluster this process can join, answered within seconds.

ray.init retries an address that does not answer (a typo, a head that is down, a port-forward
that died, another service on the port) for minutes and then fails with a long traceback; every
entry point checks the address here first and says what is wrong in one line.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


class ClusterError(RuntimeError):
    """The Ray cluster cannot serve the job as asked: the user's to fix, so every entry point
    reports it in one line, without a traceback."""


class ClusterConnectionError(ClusterError):
    """RAY_ADDRESS names no Ray cluster this process can join."""


# How long a named cluster has to answer before we call it unreachable. ray.init has no such
# bound: it retries an address that does not answer for many minutes. A head's GCS answers a
# connection within milliseconds, and ray.init itself warns after 5 s.
CONNECT_TIMEOUT_S = 5.0

WHAT_TO_CHECK = (
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
            f"RAY_ADDRESS={address} is not a Ray cluster address; {WHAT_TO_CHECK}"
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
    raise ClusterConnectionError(f"cannot reach the Ray cluster at {where}: {why}; {WHAT_TO_CHECK}")


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
    raise ClusterConnectionError(f"cannot reach the Ray cluster at {where}: {why}; {WHAT_TO_CHECK}")


def names_cluster(address: str) -> bool:
    """Whether a RAY_ADDRESS value (stripped) names a cluster to join: empty and ``local`` both
    mean a Ray instance of this process's own, on this machine."""
    return address not in ("", "local")


def env_names_cluster() -> bool:
    """Whether this process's RAY_ADDRESS names a cluster to join (no check that it answers:
    :func:`checked_ray_address` does that), as opposed to a Ray of its own that inherits its
    environment and never grows."""
    return names_cluster((os.environ.get("RAY_ADDRESS") or "").strip())


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
    if names_cluster(address):
        check_cluster_address(address)
    return address


def require_local_ray(why: str) -> None:
    """Refuse a RAY_ADDRESS naming a cluster (:class:`ClusterError`) for an entry point that
    measures this machine: a benchmark's figures are per core of this machine and its files lie
    in this machine's temporary folder, so joining a cluster gives wrong figures or disturbs
    it. ``why`` says what the entry point measures and what a cluster would do to it. An
    address that cannot be joined is refused as :func:`checked_ray_address` refuses it."""
    address = checked_ray_address()
    if names_cluster(address):
        raise ClusterError(
            f"{why}; RAY_ADDRESS names the Ray cluster at {address}. Unset RAY_ADDRESS to run "
            "it here."
        )
