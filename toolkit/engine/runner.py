"""ModelRunner: one scheduler step → one forward pass over a ragged batch → one sampled token per finishing sequence.

All scheduled tokens are concatenated into input_ids [1, T] with their own positions (no padding). The registered
`toolkit_paged` attention writes K/V into the paged cache and attends per sequence over its blocks; logits are
computed only for the last token of each sequence that samples. The model is switched to that attention once, when
the runner is built: called without a `toolkit_batch` (model.generate), it falls back to SDPA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from toolkit.engine.sampling import Sampler, suppress, token_logprobs
from toolkit.engine.step_metrics import PhaseTimes
from toolkit.layers.attention import ATTN_IMPLEMENTATION, DecodeGroup, PagedBatch, PrefillSpan
from toolkit.layers.kv_cache import PagedKVCache, as_dtype, kv_geometry
from toolkit.worker.messages import TokenLogprob

if TYPE_CHECKING:
    from toolkit.engine.request import Sequence
    from toolkit.engine.scheduler import ScheduledSequence, SchedulerOutput


@dataclass(slots=True)
class StepInputs:
    """Everything one forward needs, on the model's device."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    logits_index: torch.Tensor  # [N] rows of the ragged batch whose logits are sampled
    sampling: list[ScheduledSequence]  # the N sequences, in logits_index order
    batch: PagedBatch


class ModelRunner:
    """Owns the paged K/V tensors and the sampler; turns a SchedulerOutput into sampled tokens."""

    def __init__(
        self, model: Any, *, num_blocks: int, block_size: int, device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.float32, eos_token_ids: list[int] | tuple[int, ...] = (),
    ) -> None:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self.model = model
        self.eos_token_ids = list(eos_token_ids)  # masked while a request is short of its min_tokens
        self.device = torch.device(device)
        self.dtype = as_dtype(dtype)
        self.block_size = block_size
        layers, kv_heads, head_dim = kv_geometry(model.config)
        self.cache = PagedKVCache.allocate(layers, num_blocks, block_size, kv_heads, head_dim, self.dtype, self.device)
        self.sampler = Sampler(self.device)
        self.timings = PhaseTimes()  # of the last execute(): the engine copies them into its StepMetrics
        self.last_logprobs: dict[str, TokenLogprob] = {}  # of the last execute(), for requests that asked

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        """Run one step; returns {request_id: token} for every scheduled sequence that samples."""
        self.timings = timings = PhaseTimes()
        if not out.scheduled:
            return {}
        started = time.perf_counter()
        step = self.prepare(out.scheduled)
        prepared = time.perf_counter()
        logits = self.forward(step)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # else the forward's time would show up in sampling's first sync
        forwarded = time.perf_counter()
        timings.prepare_ms, timings.forward_ms = (prepared - started) * 1000, (forwarded - prepared) * 1000
        if not step.sampling:
            return {}
        ids = [s.seq.request_id for s in step.sampling]
        params = [s.seq.request.sampling for s in step.sampling]
        wants_logprobs = any(p.logprobs is not None for p in params)
        raw = logits.clone() if wants_logprobs else logits
        suppress(logits, [(i, self._min_tokens_mask(s.seq)) for i, s in enumerate(step.sampling)
                          if s.seq.num_output_tokens < s.seq.request.min_tokens])
        tokens = self.sampler.sample(logits, ids, params)
        self.last_logprobs = {}
        if wants_logprobs:
            for rid, lp in zip(ids, token_logprobs(raw, tokens, params), strict=True):
                if lp is not None:
                    self.last_logprobs[rid] = lp
        timings.sample_ms = (time.perf_counter() - forwarded) * 1000
        return dict(zip(ids, tokens, strict=True))

    def _min_tokens_mask(self, seq: Sequence) -> list[int]:
        return [*([] if seq.request.ignore_eos else self.eos_token_ids), *seq.request.stop_token_ids]

    def release(self, request_id: str) -> None:
        """A request finished: drop its sampling state (its blocks belong to the BlockManager)."""
        self.sampler.release(request_id)

    def forward(self, step: StepInputs) -> torch.Tensor:
        """The model forward over the paged batch; returns float32 logits [N, V] (argmax on bf16 is slow)."""
        output = self.model(
            input_ids=step.input_ids, position_ids=step.position_ids, logits_to_keep=step.logits_index,
            use_cache=False, toolkit_batch=step.batch,
        )
        return output.logits[0].float()

    def prepare(self, scheduled: list[ScheduledSequence]) -> StepInputs:
        """Single-token sequences first, longest context first (for decode groups), then ids, positions and slots."""
        decodes = sorted((s for s in scheduled if s.num_tokens == 1), key=lambda s: s.start, reverse=True)
        prefills = [s for s in scheduled if s.num_tokens != 1]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        keep: list[int] = []
        sampling: list[ScheduledSequence] = []
        for s in decodes + prefills:
            end = s.start + s.num_tokens
            ids.extend(s.seq.token_ids[s.start : end])
            positions.extend(range(s.start, end))
            slots.extend(self._slots(s.seq.block_table, s.start, end))
            if s.samples:
                keep.append(len(ids) - 1)
                sampling.append(s)
        batch = PagedBatch(self.cache, self._tensor(slots), max_context=max(s.start + s.num_tokens for s in scheduled))
        if decodes:
            self._add_decodes(batch, decodes)
        self._add_prefills(batch, prefills, len(decodes))
        return StepInputs(
            self._tensor(ids)[None], self._tensor(positions)[None], self._tensor(keep), sampling, batch
        )

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _add_decodes(self, batch: PagedBatch, decodes: list[ScheduledSequence]) -> None:
        """Split the (longest-first) decodes where the context halves, so padding wastes under half of any group."""
        start = 0
        for i in range(1, len(decodes) + 1):
            if i == len(decodes) or 2 * (decodes[i].start + 1) <= decodes[start].start + 1:
                batch.decodes.append(self._decode_group(decodes[start:i], start))
                start = i

    def _decode_group(self, decodes: list[ScheduledSequence], offset: int) -> DecodeGroup:
        """Pad every block table to the group's longest; the float mask hides the padding."""
        bs = self.block_size
        lengths = [s.start + 1 for s in decodes]
        nb = -(-max(lengths) // bs)
        tables = [s.seq.block_table[: -(-n // bs)] for s, n in zip(decodes, lengths, strict=True)]
        flat = [b for t in tables for b in (*t, *([t[0]] * (nb - len(t))))]
        visible = torch.arange(nb * bs)[None, :] < torch.tensor(lengths)[:, None]
        mask = self._additive_mask(visible)
        return DecodeGroup(offset, offset + len(decodes), self._tensor(flat), mask[:, None, None, :])

    def _add_prefills(self, batch: PagedBatch, prefills: list[ScheduledSequence], offset: int) -> None:
        """Each multi-token sequence: its query rows; with a cached prefix, its blocks and a causal mask over them."""
        bs = self.block_size
        for s in prefills:
            span = PrefillSpan(offset, offset + s.num_tokens)
            if s.start > 0:
                end = s.start + s.num_tokens
                nb = -(-end // bs)
                span.blocks = self._tensor(s.seq.block_table[:nb])
                query_pos = torch.arange(s.start, end)[:, None]
                span.mask = self._additive_mask(torch.arange(nb * bs)[None, :] <= query_pos)
            batch.prefills.append(span)
            offset += s.num_tokens

    def _additive_mask(self, visible: torch.Tensor) -> torch.Tensor:
        """0 where `visible`, -inf elsewhere, in the cache's dtype on the device: built once a step and added to the
        scores by SDPA in every layer (a bool mask would be converted to this in each of them)."""
        return torch.zeros(visible.shape, dtype=self.dtype).masked_fill_(~visible, float("-inf")).to(self.device)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)
