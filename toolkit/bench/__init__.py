"""The benchmark harness: `python -m toolkit bench` runs one seeded workload on several systems, side by side.

`main(argv)` parses the command line and returns an exit code; `run_bench(config)` returns the report as a dict.
"""

from .cli import main, parse_config, run_bench
from .config import SYSTEMS, BenchConfig

__all__ = ["SYSTEMS", "BenchConfig", "main", "parse_config", "run_bench"]
