"""Pictures of the scheduler and the paged KV cache, for the notebooks (matplotlib, any backend).

`draw_gantt` draws a simulation `Trace`: one row per request, one column per step, coloured by what the request
did in that step. `draw_kv_cache` draws a `BlockManager` as it stands: each request's logical blocks (with the slack
that `block_size` wastes at the end of the last one), an arrow to the physical block behind each, reference counts,
blocks shared through the prefix cache, and the free queue in the order it hands blocks out.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.patches import Patch, Rectangle

from toolkit.notebook.simulation import DECODE, PREEMPTED, PREFILL, STATES, WAITING, Trace

if TYPE_CHECKING:
    from toolkit.engine.block_manager import BlockManager
    from toolkit.engine.request import Sequence

STATE_COLORS = {WAITING: "#d9d9d9", PREFILL: "#f28e2b", DECODE: "#4e79a7", PREEMPTED: "#e15759"}
REQUEST_COLORS = ("#4e79a7", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f")
SHARED_COLOR = "#e15759"
FREE_COLOR = "#f0f0f0"


def draw_gantt(trace: Trace, ax: Axes | None = None, title: str = "") -> Axes:
    """Requests (rows) against steps (columns): waiting, prefill (or a prefill chunk), decode, preempted-and-waiting.

    A black x marks the step at whose start a request was preempted; a number in a prefill cell is how many of its
    tokens that step computed.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(min(14.0, max(7.0, 2 + 0.12 * trace.num_steps)), 1.1 + 0.32 * len(trace.names)))
    rows = {name: i for i, name in enumerate(trace.names)}
    for name, row in rows.items():
        for state in STATES:
            spans = _runs(trace.steps_of(name, state))
            if spans:
                ax.broken_barh(spans, (row - 0.4, 0.8), facecolors=STATE_COLORS[state], edgecolor="none")
    show_numbers = trace.num_steps <= 60
    for step, (tokens, states) in enumerate(zip(trace.tokens, trace.states, strict=True)):
        for name, n in tokens.items():
            if show_numbers and states[name] == PREFILL:
                ax.text(step + 0.5, rows[name], str(n), ha="center", va="center", fontsize=6, color="black")
    for step, names in enumerate(trace.preempted):
        for name in names:
            ax.plot(step + 0.5, rows[name], marker="x", color="black", markersize=7, mew=2)
    ax.set_yticks(range(len(trace.names)), trace.names)
    ax.set_ylim(len(trace.names) - 0.5, -0.5)
    ax.set_xlim(0, max(trace.num_steps, 1))
    ax.set_xlabel("step")
    ax.set_title(title or f"{trace.num_steps} steps, {trace.num_preemptions} preemptions", fontsize=10)
    handles = [Patch(color=STATE_COLORS[s], label=s) for s in STATES]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return ax


def _runs(steps: list[int]) -> list[tuple[int, int]]:
    """Consecutive steps as (start, length) spans for broken_barh."""
    spans: list[tuple[int, int]] = []
    for step in steps:
        if spans and spans[-1][0] + spans[-1][1] == step:
            spans[-1] = (spans[-1][0], spans[-1][1] + 1)
        else:
            spans.append((step, 1))
    return spans


@dataclass(frozen=True, slots=True)
class KVFacts:
    """What the KV picture shows, as numbers a notebook can print and assert on."""

    num_blocks: int
    used: int
    free: int
    shared: int  # blocks held by more than one block table (prefix-cache hits)
    cached_free: int  # free blocks that still hold a reusable prefix (evicted only when handed out again)
    slot_slack: int  # token slots allocated but not (yet) filled: what block_size costs
    free_order: tuple[int, ...]  # the free queue, the next block to be handed out first


def kv_facts(blocks: BlockManager, seqs: SequenceOf[Sequence]) -> KVFacts:
    """The numbers behind `draw_kv_cache` for `blocks` and the live sequences `seqs`."""
    slack = sum(len(s.block_table) * blocks.block_size - _filled(s) for s in seqs)
    return KVFacts(
        num_blocks=blocks.num_blocks, used=blocks.num_used_blocks, free=blocks.num_free_blocks,
        shared=sum(b.ref_cnt > 1 for b in blocks.blocks),
        cached_free=sum(b.block_hash is not None for b in blocks.blocks if b.ref_cnt == 0),
        slot_slack=slack, free_order=tuple(blocks.free_queue),
    )


def _filled(seq: Sequence) -> int:
    """Slots of `seq`'s table that hold K/V: its computed tokens (the newest sampled token has none yet)."""
    return seq.num_computed_tokens


def draw_kv_cache(blocks: BlockManager, seqs: SequenceOf[Sequence], ax: Axes | None = None, title: str = "") -> Axes:
    """Each sequence's logical blocks (top rows) -> the physical blocks (bottom row), with counts and the free queue.

    Logical blocks are filled in proportion to the tokens they hold; the hatched rest is slack. Physical blocks take
    their owner's colour, red with the count when shared, grey when free: `f1` is the next to be handed out, and a
    dashed edge means the free block still caches a prefix that a later request can hit.
    """
    n = blocks.num_blocks
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.0, 0.45 * n + 1.5), 1.6 + 0.7 * len(seqs)))
    colors = {s.request_id: REQUEST_COLORS[i % len(REQUEST_COLORS)] for i, s in enumerate(seqs)}
    owners: dict[int, list[str]] = {}
    for s in seqs:
        for block in s.block_table:
            owners.setdefault(block, []).append(s.request_id)
    free_rank = {block: i + 1 for i, block in enumerate(blocks.free_queue)}
    for b in blocks.blocks:
        _physical(ax, b.block_id, b.ref_cnt, b.block_hash is not None, owners.get(b.block_id, []), colors,
                  free_rank.get(b.block_id))
    bs = blocks.block_size
    for row, s in enumerate(seqs):
        y = 1.6 + 1.2 * (len(seqs) - 1 - row)
        ax.text(-0.3, y + 0.4, s.request_id, ha="right", va="center", fontsize=9)
        filled = _filled(s)
        for k, block in enumerate(s.block_table):
            tokens = max(0, min(bs, filled - k * bs))
            ax.add_patch(Rectangle((k, y), 0.9, 0.8, facecolor="white", edgecolor="black", hatch="///", lw=0.8))
            ax.add_patch(Rectangle((k, y), 0.9 * tokens / bs, 0.8, facecolor=colors[s.request_id], edgecolor="none"))
            ax.add_patch(Rectangle((k, y), 0.9, 0.8, facecolor="none", edgecolor="black", lw=0.8))
            ax.annotate("", xy=(block + 0.45, 0.85), xytext=(k + 0.45, y),
                        arrowprops={"arrowstyle": "->", "color": colors[s.request_id], "lw": 0.8, "alpha": 0.7})
    facts = kv_facts(blocks, seqs)
    ax.set_xlim(-2.2, max(n, max((len(s.block_table) for s in seqs), default=0)) + 0.2)
    ax.set_ylim(-0.6, 1.6 + 1.2 * max(len(seqs), 1))
    ax.axis("off")
    ax.set_title(title or (f"block_size={bs}: {facts.used}/{n} blocks used, {facts.shared} shared, "
                           f"{facts.slot_slack} slots of slack; free queue {list(facts.free_order[:8])}"), fontsize=9)
    ax.text(-0.3, 0.4, "physical", ha="right", va="center", fontsize=9, style="italic")
    return ax


def _physical(ax: Axes, block_id: int, ref_cnt: int, cached: bool, owners: list[str], colors: dict[str, str],
              free_rank: int | None) -> None:
    """One physical block: its id inside, its owner's colour (red when shared), its count or free rank under it."""
    if ref_cnt > 1:
        face = SHARED_COLOR
    elif owners:
        face = colors[owners[0]]
    else:
        face = FREE_COLOR
    ax.add_patch(Rectangle((block_id, 0), 0.9, 0.8, facecolor=face, edgecolor="black",
                           linestyle="--" if cached and ref_cnt == 0 else "-", lw=0.8))
    ax.text(block_id + 0.45, 0.4, str(block_id), ha="center", va="center", fontsize=7,
            color="white" if owners else "black")
    below = f"x{ref_cnt}" if ref_cnt > 1 else (f"f{free_rank}" if free_rank is not None else "")
    if below:
        ax.text(block_id + 0.45, -0.3, below, ha="center", va="center", fontsize=7,
                color=SHARED_COLOR if ref_cnt > 1 else "grey")
