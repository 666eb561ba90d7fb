"""Helpers for the walkthrough notebooks (01, 02, 08): model factories the worker imports, and the probes.

They live next to the notebooks, not in the toolkit: a spawned worker imports `walkthrough.factories` by its
"module:function" name, which only works for a module on the kernel's sys.path (the notebooks' directory).
"""
