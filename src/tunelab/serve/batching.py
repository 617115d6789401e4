"""Batched decoding for ``tunelab serve``: many answers, one forward pass per token, each row on its own terms.

Why a loop of our own and not ``model.generate``: one ``generate`` call has one set of sampling parameters, keeps
computing a row that has finished or whose client went away until the longest row ends, and cannot take in a
request that arrives while it runs. Everything else a row needs per token -- incremental text, stop strings held
back, end-of-turn tokens, cancellation, ``max_tokens`` -- is already :class:`TokenStream`, so the loop is short:
prefill the new rows, then feed every row its last token with the KV cache, choose each row's next token with its
own sampling options and random generator, and hand that token to the row's stream.

Layout. Rows are left-padded to a common width and padding is masked; position ids count only a row's real
tokens (the cumulative sum of its attention mask), so a row sees the positions, attention and therefore logits it
would see alone -- up to float rounding in reductions over a different width, which tests check does not change
greedy tokens. Rows join a running batch between two steps (continuous batching): the newcomers are prefilled
together, then their cache and the running one are left-padded to one length and concatenated. A finished or
cancelled row leaves the cache at once, and padding columns no remaining row uses are cut off, so a long answer does
not keep paying for rows that are gone.

Prompt-learning adapters go through :func:`tunelab.models.methods.prompt.virtual_token_inputs` (peft 0.21's own
``generate`` loses the prefix on transformers 5.2x): their virtual tokens sit in a row's cache like prompt tokens,
so joining and dropping rows work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, DynamicLayer

from tunelab.models.methods.prompt import cache_argument, uses_virtual_tokens, virtual_token_inputs
from tunelab.serve.generation import Completion, SamplingOptions, TokenStream


@dataclass(eq=False)
class Row:
    """One answer being generated: its prompt, its options and the stream its tokens go to."""

    prompt_ids: list[int]
    options: SamplingOptions
    stream: TokenStream
    eos_ids: tuple[int, ...]
    on_done: Callable[[Completion | None, BaseException | None], None]
    """Told the row's completion (or the error that ended it) once, after the row has left the batch."""
    generator: torch.Generator | None = None
    """Random generator for sampling (unused when greedy)."""
    token: int | None = None
    """The last token chosen, not yet fed to the model."""
    reported: bool = False

    @property
    def done(self) -> bool:
        return self.stream.finish_reason is not None

    def report(self, error: BaseException | None = None) -> None:
        """Tell ``on_done`` how the row ended (only the first call counts)."""
        if self.reported:
            return
        self.reported = True
        if error is not None:
            self.on_done(None, error)
            return
        assert self.stream.finish_reason is not None
        self.on_done(Completion(text=self.stream.text, prompt_tokens=len(self.prompt_ids),
                                completion_tokens=self.stream.tokens, finish_reason=self.stream.finish_reason), None)


def row_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator of its own per sampled row, so a seeded answer does not depend on what else is in the batch."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def choose_token(logits: torch.Tensor, row: Row) -> int:
    """The row's next token from its last logits: greedy at temperature 0, else temperature and top-p sampling.

    ``min_tokens`` forbids the end-of-sequence ids until that many tokens exist, as transformers'
    ``MinNewTokensLengthLogitsProcessor`` does.
    """
    options = row.options
    if row.stream.tokens < options.min_new_tokens and row.eos_ids:
        logits = logits.clone()
        logits[list(row.eos_ids)] = float("-inf")
    if options.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / options.temperature, dim=-1)
    ordered, order = probs.sort(descending=True)
    # Nucleus: keep the most likely tokens until their mass reaches top_p (the first is always kept).
    ordered[ordered.cumsum(0) - ordered >= options.top_p] = 0
    return int(order[torch.multinomial(ordered, 1, generator=row.generator)])


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class DecodeBatch:
    """The rows decoding together on one model (one adapter active), their KV cache and attention mask.

    Not thread-safe: one thread owns it (see :class:`tunelab.serve.engine.BatchEngine`).
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.virtual_tokens = uses_virtual_tokens(model)
        # The transformers model itself: LoRA layers live inside it; prompt-learning inputs are built here.
        self.forward = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.cache_argument = cache_argument(self.forward)
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def add(self, rows: Sequence[Row]) -> None:
        """Prefill ``rows`` together, choose their first tokens and join them to the batch."""
        for row in rows:
            if row.stream.cancel.is_set():  # its client left while it waited: not worth a prefill
                row.stream.finish("cancelled")
                row.report()
        rows = [row for row in rows if not row.done]
        if not rows:
            return
        width = max(len(row.prompt_ids) for row in rows)
        # Padding ids are masked out, so any id in the vocabulary does.
        ids = torch.tensor([[0] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows],
                            device=self.device)
        if self.virtual_tokens:
            inputs = virtual_token_inputs(self.model, ids, mask)
            inputs.setdefault(self.cache_argument, DynamicCache())
        else:
            inputs = {"input_ids": ids, "attention_mask": mask, self.cache_argument: DynamicCache()}
        mask = inputs["attention_mask"]
        fed = inputs["inputs_embeds" if "inputs_embeds" in inputs else "input_ids"].shape[1]
        # Positions of the fed tokens only: prefix tuning's virtual tokens are already in the cache.
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -fed:]
        logits = self.forward(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1).logits[:, -1]
        self._join(inputs[self.cache_argument], mask)
        self.rows.extend(rows)
        self._take(logits, list(rows))
        self._drop_finished()

    @torch.no_grad()
    def step(self) -> None:
        """One token for every row: rows whose client left are dropped first, rows that finish after."""
        for row in self.rows:
            if row.stream.cancel.is_set():
                row.stream.finish("cancelled")
        self._drop_finished()
        if not self.rows:
            return
        tokens = torch.tensor([[row.token] for row in self.rows], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        positions = self.mask.sum(dim=1, keepdim=True) - 1
        logits = self.forward(input_ids=tokens, attention_mask=self.mask, position_ids=positions,
                              use_cache=True, **{self.cache_argument: self.cache}).logits[:, -1]
        self._take(logits, self.rows)
        self._drop_finished()

    def clear(self) -> list[Row]:
        """Empty the batch (after an error); returns the rows that were in it, for the caller to report to."""
        rows, self.rows, self.cache = self.rows, [], None
        self.mask = self.mask[:0, :0]
        return rows

    def _take(self, logits: torch.Tensor, rows: Sequence[Row]) -> None:
        for row, row_logits in zip(rows, logits, strict=True):
            row.token = choose_token(row_logits, row)
            row.stream.step(row.token)

    def _join(self, cache: Any, mask: torch.Tensor) -> None:
        layers = _layers(cache)  # checked before the batch changes
        if not self.rows:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(_layers(self.cache), layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)])
            old.values = torch.cat([_pad_left(old.values, width, 2), _pad_left(new.values, width, 2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])

    def _drop_finished(self) -> None:
        finished = [row for row in self.rows if row.done]
        if not finished:
            return
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        self.rows = [self.rows[i] for i in keep]
        if self.rows:
            index = torch.tensor(keep, device=self.device)
            self.mask = self.mask[index]
            unused = int((self.mask.cumsum(1) == 0).sum(1).min())  # leading columns that are padding in every row
            self.mask = self.mask[:, unused:]
            for layer in _layers(self.cache):
                layer.keys = layer.keys[index, :, unused:]
                layer.values = layer.values[index, :, unused:]
        else:
            self.cache, self.mask = None, self.mask[:0, :0]
        for row in finished:
            row.report()


def _layers(cache: Any) -> list[Any]:  # DynamicLayer, its keys/values typed Optional but set once filled
    """The cache's layers, each a plain ``DynamicLayer`` (keys/values of shape batch x heads x length x dim).

    Joining and dropping rows edit these tensors; a layer of another kind (sliding window, quantized) would need
    its own rules, so it is refused rather than mishandled.
    """
    layers = list(cache.layers)
    for layer in layers:
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(f"the batching engine supports full-attention caches only, not "
                                      f"{type(layer).__name__}; serve with --max-batch-size 1")
    return layers
