"""The one Ray setting the project makes outside ``ray.init``: a local Ray on loopback.

Ray 2.60 binds a node's servers to loopback only when the node's IP is loopback, and to every
interface otherwise (``get_localhost_ip() if is_localhost(ip) else get_all_interfaces_ip()``,
``ray/dashboard/agent.py``; the GCS, raylet, worker and driver gRPC servers in Ray's binaries
follow the same rule, the runtime env agent binds the node IP). A local Ray takes the machine's
external address as its IP, so a search without ``--address`` listened on all interfaces.
``ray.init`` has no public way to choose the IP, and its private ``_node_ip_address`` turns
127.0.0.1 back into the external address (``ray/_private/worker.py`` ->
``services.resolve_ip_for_localhost``). The IP is loopback when ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
is 0: no multi-node cluster, so Ray uses the loopback address as it does on Windows and macOS
(``ray/_private/services.py`` ``get_node_ip_address``). Ray reads that variable once, in
``ray/_private/ray_constants.py`` when ``ray`` is imported: it must be set before the driver
imports ray (its Ray processes inherit it). Joining a cluster is unaffected (the driver takes
the IP of the node it joins); ``ray start`` for a worker node refuses to run with it, so it is
never exported beyond this process and its Ray.

No ray import here (only ``tuner.trainable`` imports ray), and no private Ray attribute.
"""

from __future__ import annotations

import os

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def keep_local_ray_on_loopback() -> None:
    """Called before ``import ray``: the local Ray this process starts then listens on loopback
    only (``tuner.trainable.start_ray`` warns when ray was imported too early for it)."""
    os.environ[LOOPBACK_ENV] = "0"
