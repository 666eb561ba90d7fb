"""The notebook side of the toolkit: a live telemetry Dashboard and an ipywidgets PromptConsole."""

from .console import PromptConsole
from .dashboard import Dashboard

__all__ = ["Dashboard", "PromptConsole"]
