"""Inside the worker (MAX's chapters 5 and 6): requests, the scheduler, the block manager, sampling, the runner
and the `Engine` core that steps them. Nothing here is imported by the parent side."""
