"""What the worker reports about itself, as the parent keeps it: `MetricsLog` and its DataFrames."""

from toolkit.telemetry.metrics import MetricsLog

__all__ = ["MetricsLog"]
