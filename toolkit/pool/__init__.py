"""Model-worker replicas on Ray behind the ModelWorker handle interface: `start_worker_pool(settings, replicas=N)`.

On one machine nothing needs setting up: the pool starts a private Ray and stops it at shutdown.

    pool = start_worker_pool(Settings(model="smollm2-135m-instruct", device="cpu"), replicas=2, num_cpus_per_replica=1)
    pipe = TokenGeneratorPipeline(pool)

On two machines (same Python environment and toolkit on both, ports open between them):

    # machine A (head)
    ray start --head --port=6379 --num-cpus=8
    # machine B
    ray start --address=<A's IP>:6379 --num-cpus=8
    # the notebook, on A (or any machine that joined)
    pool = start_worker_pool(settings, replicas=2, ray_address="auto", num_cpus_per_replica=8)

Where Ray's token authentication is on (the default for every cluster from Ray 2.61; `ray start` clusters of 2.60
have it off), B and the notebook need A's token: `ray get-auth-token` on A, then `export RAY_AUTH_TOKEN=<it>`
before `ray start` on B and before starting the notebook.

Each replica reserves num_cpus_per_replica CPUs (and one GPU when the settings ask for CUDA), so Ray places one
replica per machine here. `ray stop` on each machine ends the cluster; the pool only kills its own actors.
"""

from toolkit.pool.client import WorkerPool, start_worker_pool
from toolkit.pool.router import PrefixRouter

__all__ = ["PrefixRouter", "WorkerPool", "start_worker_pool"]
