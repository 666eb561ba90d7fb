"""Fused projections: the stacked GEMM gives what the separate linears gave, without copying the weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.factories import FAMILIES, SMALL, small_model
from toolkit.layers.fused import FusedProjection, ProjectionSlice, fuse_projections
from toolkit.layers.linear import CpuLinear, KernelChoice, LinearPlan, install

ONEDNN_PLAN = LinearPlan((KernelChoice(1, None, "onednn"),))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("plan", [None, ONEDNN_PLAN])
def test_fused_model_gives_the_same_logits(family: str, plan: LinearPlan | None) -> None:
    """Qwen2 has q/k/v biases, Qwen3 norms q and k per head; with and without oneDNN on the stacked GEMM."""
    model = small_model(family)
    reference = copy.deepcopy(model)
    if plan is not None:
        install(model, plan)
    assert fuse_projections(model, plan) == 2 * SMALL["num_hidden_layers"]
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.k_proj, ProjectionSlice) and isinstance(layer.mlp.up_proj, ProjectionSlice)
    assert isinstance(layer.self_attn.o_proj, CpuLinear if plan else nn.Linear)  # not part of any group
    ids = torch.randint(0, SMALL["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-4)
    assert fuse_projections(model, plan) == 2 * SMALL["num_hidden_layers"]  # again: a no-op


def test_slices_are_views_of_one_stacked_weight() -> None:
    """No weight is duplicated: every slice's weight lives in its group's stacked storage, state_dict is unchanged."""
    model = small_model("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = sum(p.numel() for p in model.parameters())
    fuse_projections(model)
    attn = model.model.layers[1].self_attn
    group = attn.q_proj.fused
    assert isinstance(group, FusedProjection)
    stacked = group.linear.weight
    for part in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert part.weight.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
        assert part.bias.untyped_storage().data_ptr() == group.linear.bias.untyped_storage().data_ptr()
    assert sum(p.numel() for p in model.parameters()) == params_before  # the group is not a submodule
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=0, rtol=0)


def test_one_gemm_serves_all_parts_of_the_same_input() -> None:
    layer = nn.Linear(8, 12, bias=False).requires_grad_(False)
    parent = nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = layer, copy.deepcopy(layer), copy.deepcopy(layer)
    separate = [copy.deepcopy(m) for m in (parent.q_proj, parent.k_proj, parent.v_proj)]
    assert fuse_projections(parent) == 1
    group = parent.q_proj.fused
    calls = []
    group.linear.register_forward_hook(lambda *_: calls.append(1))
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    with torch.inference_mode():
        outs = [parent.q_proj(x), parent.k_proj(x), parent.v_proj(x)]
        assert len(calls) == 1
        for got, ref in zip(outs, separate, strict=True):
            torch.testing.assert_close(got, ref(x))
        assert group._input is None  # every part taken: nothing is held
        torch.testing.assert_close(parent.k_proj(y), separate[1](y))  # another input, out of order
        torch.testing.assert_close(parent.k_proj(y), separate[1](y))  # asked twice: computed again
        torch.testing.assert_close(parent.q_proj(x), separate[0](x))  # a different input than the waiting parts
        assert len(calls) == 4


def test_groups_that_differ_are_left_alone() -> None:
    parent = nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = nn.Linear(8, 4), nn.Linear(6, 4), nn.Linear(8, 4)  # widths
    parent.gate_proj, parent.up_proj = nn.Linear(8, 4), nn.Linear(8, 4, bias=False)  # bias on one only
    parent.gate_proj.register_forward_hook(lambda *_: None)
    assert fuse_projections(parent.requires_grad_(False)) == 0
    assert type(parent.q_proj) is nn.Linear and type(parent.gate_proj) is nn.Linear


def test_engine_fuses_the_model_it_serves() -> None:
    from toolkit.engine.core import Engine
    from toolkit.settings import Settings

    engine = Engine(Settings(model="tiny-random-llama", device="cpu", dtype="float32", num_kv_blocks=8))
    layers = engine.config.num_hidden_layers
    assert engine.fused_projections == 2 * layers
    assert sum(isinstance(m, ProjectionSlice) for m in engine.model.modules()) == 5 * layers
