"""Multi-host initialisation (TPU pods, multi-node GPU, CPU clusters).

Call ``initialize()`` before anything else touches JAX (``mtl train`` does). On one
machine it does nothing. Launch a pod job by running the *same* command on every host;
each host reads only its shard of every batch and orbax writes one checkpoint jointly.

Where the process layout comes from, in order:
1. explicit environment: ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0),
   ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (and optionally ``JAX_LOCAL_DEVICE_IDS``);
2. a cluster JAX detects by itself: Cloud TPU pod slices, SLURM (``srun``), Open MPI
   (``mpirun``), Kubernetes/GKE jobs — then ``jax.distributed.initialize()`` with no
   arguments;
3. otherwise: single process.
"""
from __future__ import annotations

import os

_AUTO_MARKERS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_MCA_orte_hnp_uri")


def _detected_cluster(env) -> str | None:
    if any(env.get(k) for k in _AUTO_MARKERS):
        return "auto"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_JOB_ID"):
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "openmpi"
    return None


def initialize(env: dict | None = None) -> dict:
    """Initialise multi-host JAX when the environment describes several processes.

    Returns ``{"mode", "process_index", "process_count"}``.
    """
    import jax

    env = os.environ if env is None else env
    addr = env.get("JAX_COORDINATOR_ADDRESS")
    if addr:
        try:
            n = int(env["JAX_NUM_PROCESSES"])
            pid = int(env["JAX_PROCESS_ID"])
        except KeyError as e:
            raise RuntimeError(f"JAX_COORDINATOR_ADDRESS is set but {e.args[0]} is not; set JAX_NUM_PROCESSES "
                               "and JAX_PROCESS_ID on every host") from None
        if not 0 <= pid < n:
            raise RuntimeError(f"JAX_PROCESS_ID={pid} must be in [0, JAX_NUM_PROCESSES={n})")
        local = env.get("JAX_LOCAL_DEVICE_IDS")
        kwargs = {"local_device_ids": [int(i) for i in local.split(",")]} if local else {}
        jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid, **kwargs)
        mode = "explicit"
    else:
        mode = _detected_cluster(env)
        if mode is None:
            return {"mode": "single", "process_index": 0, "process_count": 1}
        jax.distributed.initialize()
    return {"mode": mode, "process_index": jax.process_index(), "process_count": jax.process_count()}
