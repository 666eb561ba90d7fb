"""What the worker reports about itself, as the parent keeps it: `MetricsLog` and its DataFrames."""

from toolkit.telemetry.metrics import MetricsLog, occupancy

__all__ = ["MetricsLog", "occupancy"]
