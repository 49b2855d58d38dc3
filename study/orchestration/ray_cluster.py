"""Which Ray a study runs on, found the way Ray programs find it, and the connection to it.

Precedence: ``--address`` on the command line, the spec's ``address``, ``RAY_ADDRESS`` (which
``ray job submit`` sets for its driver), then a new local instance on 127.0.0.1. ``local`` in the
flag or the spec asks for a new local instance whatever RAY_ADDRESS says; ``auto`` is Ray's own
search (RAY_ADDRESS, then the cluster ``ray start`` last recorded on this machine, then any Ray
instance running here).

Unlike a bare ``ray.init()``, a study with none of the four does not join a cluster merely because
``ray start`` ran on this machine (Ray's current-cluster file): on a shared machine that may be
someone else's cluster, and a study that silently moved onto it would put its trials, and its
failures, there. ``--address auto`` asks for exactly that join.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from study.config import ConfigError

#: Where each source of an address is named in messages.
SOURCES = ("--address", "address", "RAY_ADDRESS")

_CLIENT_REFUSAL = (
    "is a Ray Client (ray://) address, which robust-study does not use: Ray Tune's driver and the "
    "files it writes (spec, results, Optuna's database) must live on the cluster. Submit the study "
    "instead: ray job submit --address http://<head>:8265 -- robust-study run SPEC"
)


@dataclass(frozen=True)
class RayTarget:
    """The Ray a study will use: ``address`` None means a new local instance."""

    address: str | None
    source: str
    """``--address``, ``address`` (the spec), ``RAY_ADDRESS`` or ``default``."""

    @property
    def local(self) -> bool:
        return self.address is None


def resolve_address(flag: str | None, spec_address: str | None, env: Mapping[str, str]) -> RayTarget:
    """Pure precedence: the first of flag, spec, RAY_ADDRESS that is set; else a local instance.

    Empty values count as unset (as Ray treats an empty RAY_ADDRESS); ``local`` from any source
    means a new local instance.
    """
    for source, value in zip(SOURCES, (flag, spec_address, env.get("RAY_ADDRESS"))):
        if value is not None and value.strip():
            value = value.strip()
            return RayTarget(None if value == "local" else value, source)
    return RayTarget(None, "default")


def validate_target(target: RayTarget) -> None:
    """The address's form, without touching the network: one line naming its source."""
    address = target.address
    if address is None or address == "auto":
        return
    if address.startswith("ray://"):
        raise ConfigError(f"{target.source}: {address!r} {_CLIENT_REFUSAL}")
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(
            f"{target.source}: {address!r} must be host:port (the head's GCS, e.g. 10.0.0.5:6379), auto or local"
            + ("; an http:// dashboard URL is for ray job submit --address" if "://" in address else "")
        )


def check_reachable(target: RayTarget, timeout: float = 5.0) -> None:
    """A concrete host:port must accept connections: fail in seconds, not after Ray's minute of
    retries. Probed where Ray will dial: Ray replaces localhost/127.0.0.1 by this machine's node
    address unless clustering is off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)."""
    import socket

    validate_target(target)
    if target.address is None or target.address == "auto":
        return
    from ray._private.services import canonicalize_bootstrap_address

    try:
        dialed = canonicalize_bootstrap_address(target.address) or target.address
    except ValueError:
        dialed = target.address
    host, _, port = dialed.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, OverflowError, ValueError) as err:  # refused, unknown host, bad port
        via = "" if dialed == target.address else f" (dialled as {dialed})"
        raise ConfigError(
            f"{target.source}: cannot reach Ray at {target.address}{via} ({getattr(err, 'strerror', None) or err}); "
            "start the cluster (ray start --head) or fix the address"
        ) from None


class _DropTokenAuthNotice(logging.Filter):
    """Ray 2.60's ray.init() warns "Token authentication is enabled for this Ray cluster" every
    time it starts a local instance with RAY_AUTH_MODE unset (enable_token_auth_by_default in
    ray._private.authentication.authentication_token_setup). Authentication stays on; the notice
    says nothing the user must act on for a private instance on 127.0.0.1, so only it is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled for this Ray cluster")


_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


def init_ray(target: RayTarget, num_cpus: int) -> None:
    """Start a local instance (``num_cpus`` CPUs, loopback only) or connect to the cluster.

    On a cluster nothing local-only is passed (num_cpus, include_dashboard, ...): Ray refuses
    them with a ValueError when connecting.
    """
    import ray

    if ray.is_initialized():
        return
    if target.local:
        # A local instance stays on loopback: no traffic leaves the machine. The variable reaches
        # the processes ray.init starts (GCS, raylet bind 127.0.0.1), but Ray's Python side read
        # it into a constant when ray was first imported (ray.tune already is): without updating
        # that too, the node takes the machine's outward address.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
        token_logger = logging.getLogger(_TOKEN_LOGGER)
        if not any(isinstance(f, _DropTokenAuthNotice) for f in token_logger.filters):
            token_logger.addFilter(_DropTokenAuthNotice())
        # "local", not None: None would join a cluster found through RAY_ADDRESS or Ray's
        # current-cluster file, and then refuse num_cpus.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
        return
    try:
        ray.init(address=target.address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as err:
        hint = ""
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            # Ray enables token authentication only for a cluster it finds itself, never for a
            # given address: a driver for a cluster with tokens must say so.
            hint = "; if the cluster uses token authentication set RAY_AUTH_MODE=token (and RAY_AUTH_TOKEN)"
        raise ConfigError(
            f"{target.source}: cannot connect to Ray at {target.address} ({str(err).splitlines()[0]}){hint}"
        ) from None


def describe(target: RayTarget) -> str:
    """One line: which Ray the study runs on (call after :func:`init_ray`)."""
    import ray

    resources = ray.cluster_resources()
    size = f"{resources.get('CPU', 0):g} CPUs" + (f", {resources['GPU']:g} GPUs" if resources.get("GPU") else "")
    if target.local:
        return f"Ray: new local instance on 127.0.0.1 ({size})"
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    gcs = ray.get_runtime_context().gcs_address
    source = "the spec's address" if target.source == "address" else target.source
    given = "" if target.address == gcs else f" {target.address}"
    return f"Ray: cluster at {gcs} (from {source}{given}), {nodes} node{'s' * (nodes != 1)}, {size}"
