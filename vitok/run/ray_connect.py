"""Joining a Ray cluster for ``--engine ray``: the address is checked before anything starts, the wait for the
cluster is bounded, and each way it fails is one line naming the address and the fix.

    --address, else RAY_ADDRESS    check_address: its form, a usage error (exit 2) before Ray is even imported
      -> the address to join       auto, or none given: RAY_ADDRESS, else the cluster 'ray start' started on this
                                   node (auto: else any running here); none given and none found: a new local
                                   instance (so no wait)
      -> token authentication      RAY_AUTH_MODE=token needs the token before anything connects (Ray's native
                                   client ends the process without one); a missing or refused token: exit 2
      -> does a cluster answer?    a TCP connection, then the cluster's id from its GCS, within --connect-timeout
                                   seconds; else ``ClusterError`` "no Ray cluster at ADDRESS (why)" (exit 1)
      -> ray.init                  its own failures, one line each

Why the probe: Ray's own wait at an address where nothing answers is unbounded in practice (its driver tries 20
times, each try up to 40 s, printing a line every few seconds). The probe's GCS client runs in a daemon thread that
is abandoned when the time is up; it holds nothing the process needs to exit.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

from ..errors import ClusterError, UsageError

KEYWORDS = ("auto", "local")  # auto: the cluster running on this node (an error if none); local: a new instance
CLIENT = "ray://"  # Ray Client (the ``ray[client]`` extra): the client server's port, 10001 by default
AUTH_MODES = ("disabled", "token")  # RAY_AUTH_MODE's values (Ray 2.60's token authentication)
FORMS = ("HOST:PORT (the head's GCS port, 6379 by default), auto, local or ray://HOST:PORT; or leave it out to "
         "join the cluster Ray finds or start a local one")
TOKEN_PLACES = "RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token"


def check_address(address: str, name: str = "--address") -> tuple[str, int] | None:
    """The (host, port) an address names, or None for ``auto`` / ``local``; a usage error naming ``name`` (the flag
    or the variable it came from) and the accepted forms otherwise. Pure: no Ray, no network."""
    shown = f"{name} {address!r}"
    if address in KEYWORDS:
        return None
    if not address.strip():
        raise UsageError(f"{shown} names no Ray cluster; give {FORMS}")
    if any(c.isspace() for c in address):
        raise UsageError(f"{shown} holds white space; give {FORMS}")
    rest = address
    if "://" in address:
        scheme = address.split("://", 1)[0] + "://"
        if scheme != CLIENT:
            raise UsageError(f"{shown}: {scheme} is the address of the dashboard or the job API, not of the "
                             "cluster; give the head's GCS address HOST:PORT (6379 by default) or ray://HOST:10001")
        rest = address[len(CLIENT):]
        if not rest:
            raise UsageError(f"{shown} needs a host and a port: ray://HOST:PORT (the client server's, 10001 by "
                             "default)")
    if rest.startswith("["):  # [IPv6]:PORT
        host, _, port = rest[1:].partition("]")
        if not port.startswith(":"):
            raise UsageError(f"{shown} needs a port after the host: [HOST]:PORT")
        port = port[1:]
    else:
        host, colon, port = rest.rpartition(":")
        if not colon:
            raise UsageError(f"{shown} needs a port: HOST:PORT (the head's GCS port, 6379 by default)")
        if ":" in host:
            raise UsageError(f"{shown}: an IPv6 host goes in brackets, [HOST]:PORT")
    if not host:
        raise UsageError(f"{shown} needs a host before the port: HOST:PORT")
    if not port.isdigit():
        raise UsageError(f"{shown}: port {port!r} is not a number; give {FORMS}")
    if not 1 <= int(port) <= 65535:
        raise UsageError(f"{shown}: port {int(port)} is not in 1..65535")
    return host, int(port)


def join(address: str | None, timeout: float, runtime_env: dict[str, Any]) -> bool:
    """Join the cluster ``address`` names (or the one Ray finds, or start a local instance), waiting at most
    ``timeout`` seconds for it to answer; True if this call started Ray in this process."""
    import ray

    if ray.is_initialized():
        return False
    name = "--address"
    if address in (None, "auto") and os.environ.get("RAY_ADDRESS"):  # Ray's own rule: the variable wins there
        address, name = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if address is not None:
        check_address(address, name)
    mode = _auth_mode()
    if address is not None and address.startswith(CLIENT):
        return _join_client(ray, address, timeout, runtime_env)
    target, shown = _resolve(address, name)
    if target is None:  # a new local instance: nothing to wait for
        _init(ray, None, "a new local Ray instance", address=address, include_dashboard=False,
              configure_logging=False, runtime_env=runtime_env)
        return True
    if address in (None, "auto"):  # as ray.init does for a cluster it found: a token on file turns tokens on
        mode = _enable_token_if_available() or mode
    _check_token(mode)
    _probe(target, shown, timeout)
    _init(ray, shown, f"the Ray cluster at {shown}", address=address, include_dashboard=False,
          configure_logging=False, runtime_env=runtime_env)
    return True


def _auth_mode() -> str:
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is None:
        return "disabled"
    if mode.lower() not in AUTH_MODES:
        raise UsageError(f"RAY_AUTH_MODE {mode!r} is not one of: {', '.join(AUTH_MODES)}")
    return mode.lower()


def _resolve(address: str | None, name: str) -> tuple[str | None, str]:
    """The GCS address (host:port, as Ray will dial it) and how to name it in messages; None: start a local one."""
    from ray._private import services

    if address == "local":
        return None, "local"
    try:
        target = services.canonicalize_bootstrap_address(address)
    except ConnectionError as exc:  # auto, and nothing found
        raise ClusterError("no Ray cluster found for --address auto (none runs on this node and RAY_ADDRESS is not "
                           "set); start one with 'ray start --head', give its address HOST:PORT, or leave "
                           "--address out to start a local instance") from exc
    except ValueError as exc:  # a form check_address let through and Ray does not take
        raise UsageError(f"{name} {address!r}: {_first_line(exc)}; give {FORMS}") from exc
    if target is None:
        return None, "local"
    if address is None:
        shown = f"{target} (the cluster Ray found on this node)"
    elif address == "auto":
        shown = f"{target} (found by --address auto)"
    elif name == "RAY_ADDRESS":
        shown = f"{address} (RAY_ADDRESS)"
    else:
        shown = address
    return target, shown


def _enable_token_if_available() -> str | None:
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return None
    return "token" if maybe_enable_token_auth_if_token_available(warn_if_disabled=False) else None


def _check_token(mode: str) -> None:
    """Token authentication on and no token anywhere: say where one goes (Ray's native client would end the
    process)."""
    if mode != "token":
        return
    try:
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:
        return
    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # read again: the variables may have changed since this process first looked
    if not loader.has_token(ignore_auth_mode=True):
        raise UsageError(f"RAY_AUTH_MODE=token but there is no Ray token: put the cluster's token in {TOKEN_PLACES} "
                         "('ray get-auth-token' on the head prints it)")


def _probe(target: str, shown: str, timeout: float) -> None:
    """Within ``timeout`` seconds: something accepts a connection at ``target``, and it answers as a Ray GCS."""
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    dials = "" if shown.startswith(target) else f"Ray dials {target}: "  # a loopback host: this node's address

    def nobody(why: str, fix: str) -> ClusterError:
        return ClusterError(f"no Ray cluster at {shown} ({dials}{why}); {fix}")

    deadline = time.monotonic() + timeout
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except ConnectionRefusedError as exc:
        raise nobody("connection refused, nothing listens there",
                     f"start one with 'ray start --head --port {port}', or fix --address") from exc
    except TimeoutError as exc:
        raise nobody(f"no answer within {timeout:g} s",
                     "check the host, the port and any firewall between, or raise --connect-timeout") from exc
    except socket.gaierror as exc:
        raise nobody(f"the host {host!r} is not known: {exc.strerror}", "fix --address") from exc
    except OSError as exc:
        raise nobody(exc.strerror or str(exc), "fix --address") from exc
    answer: dict[str, Any] = {}

    def ask() -> None:
        from ray._raylet import GcsClient

        try:
            answer["id"] = GcsClient(address=target).cluster_id
        except BaseException as exc:  # handed to the main thread
            answer["error"] = exc

    thread = threading.Thread(target=ask, name="vitok-ray-probe", daemon=True)
    thread.start()
    thread.join(max(0.1, deadline - time.monotonic()))
    if thread.is_alive():
        raise nobody(f"something listens there, but no Ray cluster answered within {timeout:g} s",
                     "give the head's GCS port (6379 by default; 'ray status' on the head names it), or raise "
                     "--connect-timeout")
    error = answer.get("error")
    if error is not None:
        _raise_auth(error, shown)
        raise nobody(_first_line(error), "fix --address") from error


def _raise_auth(error: BaseException, shown: str) -> None:
    """A cluster with token authentication that refused this driver: a usage error saying what to set."""
    try:
        from ray.exceptions import AuthenticationError
    except ImportError:
        return
    if isinstance(error, AuthenticationError):
        sends = ("" if os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
                 else " (RAY_AUTH_MODE is not 'token', so this driver sends none)")
        raise UsageError(f"the Ray cluster at {shown} refused this driver's token{sends}; set RAY_AUTH_MODE=token "
                         f"and the cluster's token in {TOKEN_PLACES}") from error


def _join_client(ray, address: str, timeout: float, runtime_env: dict[str, Any]) -> bool:
    """Ray Client: needs its extra; the client server must accept a connection within the timeout."""
    import importlib.util

    if importlib.util.find_spec("grpc") is None:
        raise UsageError(f"--address {address}: Ray Client needs its extra (pip install 'ray[client]'), or run "
                         "vitok on a node of the cluster with --address HOST:PORT")
    host, port = check_address(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        why = "connection refused: nothing listens there" if isinstance(exc, ConnectionRefusedError) else (
            f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else exc.strerror or str(exc))
        raise ClusterError(f"no Ray cluster at {address} ({why}); start the head with 'ray start --head' (its "
                           "client server listens on 10001), or fix --address") from exc
    _init(ray, address, f"the Ray cluster at {address}", address=address, runtime_env=runtime_env)
    return True


def _init(ray, shown: str | None, what: str, **kwargs: Any) -> None:
    """``ray.init``, its failures as one line each."""
    from ray.exceptions import AuthenticationError

    try:
        ray.init(**kwargs)
    except AuthenticationError as exc:
        if shown is None:
            raise UsageError(f"starting a local Ray instance: {_first_line(exc)}") from exc
        _raise_auth(exc, shown)
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
        verb = "start" if shown is None else "join"
        raise ClusterError(f"cannot {verb} {what}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].rstrip(".")


__all__ = ["check_address", "join"]
