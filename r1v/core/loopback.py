"""A local Ray cluster on the loopback address.

Ray binds a new node (GCS, raylet, object manager) to the machine's interface address unless told otherwise, which
makes a single-machine run reachable from the machine's network; `ray.init(_node_ip_address=...)` alone does not
change that (Ray resolves 127.0.0.1 back to the interface address). Ray's own switch for this is the one it uses on
macOS and Windows.
"""

from __future__ import annotations

import os

ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_only() -> None:
    """Make the local cluster this process is about to start (and the processes it spawns) use 127.0.0.1.

    Only for a cluster of this process's own: a driver that joins a remote cluster must keep its real address."""
    os.environ[ENV] = "0"
    import ray._private.ray_constants as rc  # read once at import: set it for this process too

    rc.ENABLE_RAY_CLUSTER = False
