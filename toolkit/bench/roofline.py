"""The machine's matmul ceiling for a dtype, and the model FLOPs a workload needs: together, its roofline.

The measurements themselves live in toolkit.engine.hardware (the worker's start-up probe uses them too).
"""

from __future__ import annotations

from toolkit.engine.hardware import gemm_gflops, param_counts

__all__ = ["gemm_gflops", "model_flops", "param_counts"]


def model_flops(num_params: int, lm_head_params: int, prompt_tokens: int, output_tokens: int) -> float:
    """2 x params per generated token; a prompt token's logits are never computed, so it skips the lm_head."""
    return 2.0 * num_params * output_tokens + 2.0 * (num_params - lm_head_params) * prompt_tokens
