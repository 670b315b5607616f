"""Joining a cluster: launches that start several processes are recognised from their environment."""
from sdjax.train.distributed import in_cluster


def test_cluster_launches_are_detected():
    assert not in_cluster({}) and not in_cluster({"SLURM_NTASKS": "1"})
    assert in_cluster({"SLURM_NTASKS": "16"}) and in_cluster({"OMPI_COMM_WORLD_SIZE": "2"})
    assert in_cluster({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}) and not in_cluster({"TPU_WORKER_HOSTNAMES": "a"})
