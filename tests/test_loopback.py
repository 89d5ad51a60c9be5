"""A local cluster r1v starts (`r1v run` without an address, the tests' session cluster) binds the loopback address,
not the machine's interface address."""

from __future__ import annotations


def test_the_local_cluster_is_on_loopback(ray_cluster):
    import ray

    assert ray_cluster.startswith("127.0.0.1:"), ray_cluster
    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
