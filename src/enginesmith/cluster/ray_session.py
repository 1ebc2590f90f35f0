"""Connecting to Ray: a cluster at an address, or a local instance started for this process.

Ray is an optional extra (``pip install 'enginesmith[ray]'``) and is imported only here and in the
modules that run on it, inside functions. Every connection turns Ray's usage statistics off and
starts no dashboard (the machines this runs on need not reach the internet), and keeps Ray's own
INFO logs off the terminal unless ``verbose``.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from ..errors import EnginesmithError, MissingDependencyError

RAY_EXTRA = "pip install 'enginesmith[ray]'"

# Loggers Ray and Ray Serve print INFO lines through ("Started Serve in namespace ...").
RAY_LOGGERS = ("ray", "ray.serve", "ray.data")


class RayConnectionError(EnginesmithError):
    """No Ray cluster answers at the address given, or a local instance could not start."""


@dataclass(frozen=True)
class RaySession:
    """Where this process is connected: the cluster's address, whether :func:`connect` connected this
    process (else it already was) and whether it started the instance, and the cluster's resources."""

    address: str
    connected_here: bool
    started_here: bool
    resources: dict[str, float]

    @property
    def gpus(self) -> int:
        return int(self.resources.get("GPU", 0))

    @property
    def cpus(self) -> float:
        return float(self.resources.get("CPU", 0))


def import_ray() -> Any:
    """The ``ray`` module, or one error naming the extra."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(f"running on Ray needs ray[serve,data]: {RAY_EXTRA}") from None
    return ray


def quiet_ray_loggers(verbose: bool = False) -> None:
    """INFO and up with ``verbose``; else warnings, and from Ray Serve errors only: its router warns once
    per request when a replica dies, and the server says so itself, once."""
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        logging.getLogger("ray.serve").setLevel(logging.ERROR)


def connect(address: str | None = None, *, num_cpus: int | None = None, verbose: bool = False) -> RaySession:
    """Connect to the Ray cluster at ``address`` ("auto": the one ``ray start`` began on this machine;
    "ray://HOST:10001": Ray Client), or start a local instance when None. Already connected: kept as is."""
    ray = import_ray()
    quiet_ray_loggers(verbose)
    if ray.is_initialized():
        context = ray.get_runtime_context()
        if address not in (None, "auto", context.gcs_address):
            raise RayConnectionError(f"this process is already connected to the Ray cluster at {context.gcs_address}, "
                                     f"not '{address}': one process talks to one cluster")
        return RaySession(context.gcs_address, False, False, dict(ray.cluster_resources()))
    # Ray's workers inherit the environment: no usage statistics from them either.
    options: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.INFO if verbose else logging.WARNING,
        "log_to_driver": verbose,
        "configure_logging": True,
        "runtime_env": {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
    }
    if address is None:
        # "local" starts an instance of our own: a bare ray.init() would join whatever `ray start` left on
        # this machine (another user's cluster) without a word.
        options["num_cpus"] = num_cpus
    elif num_cpus is not None:
        raise RayConnectionError("num_cpus is for a local instance; a cluster at an address has its own resources")
    else:
        check_reachable(address)
    try:
        ray.init(address=address or "local", **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"at '{address}'" if address else "locally"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (" (start one with 'ray start --head', then pass its address, e.g. HOST:6379)"
                if address else "")
        raise RayConnectionError(f"cannot connect to Ray {where}: {first}{hint}") from None
    context = ray.get_runtime_context()
    return RaySession(context.gcs_address, True, address is None, dict(ray.cluster_resources()))


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail at once when nothing listens at HOST:PORT: ray.init would wait for minutes, printing warnings."""
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return  # "auto", ray://: Ray finds or reaches them its own way
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RayConnectionError(f"cannot connect to Ray at '{address}': nothing answers there ({reason}); start a "
                                 "cluster with 'ray start --head' and pass its address (HOST:6379), or leave "
                                 "--address out to start a local instance") from None


def disconnect(session: RaySession) -> None:
    """Leave the cluster if :func:`connect` joined it; a local instance started there stops with it."""
    ray = import_ray()
    if session.connected_here and ray.is_initialized():
        ray.shutdown()
