"""Model-worker replicas on Ray behind the ModelWorker handle interface: `start_worker_pool(settings, replicas=N)`."""

from toolkit.pool.client import WorkerPool, start_worker_pool
from toolkit.pool.router import PrefixRouter

__all__ = ["PrefixRouter", "WorkerPool", "start_worker_pool"]
