"""Turn one step's logits into one token per request (torch).

The runner hands the sampler ``logits [N, V]`` and one ``SamplingRow`` per row; it gets a
``SamplerOutput`` back. The caller's logits are never written to. The pipeline for a row,
in order, follows vLLM v1 and the OpenAI API:

1. **Penalties** (only rows with ``params.has_penalties``).
   ``repetition_penalty`` (HF/vLLM): for every token seen in prompt + output, a positive
   logit is divided by it and a non-positive one multiplied. Then, over OUTPUT tokens only
   (OpenAI): ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``.
   **logit_bias** (rows with one): each ``(token id, bias)`` pair is added to that
   token's logit (ids outside the logits' columns are skipped).
2. **min_tokens**: while ``len(output_token_ids) < min_tokens`` the row's
   ``stop_token_ids`` and, unless ``ignore_eos``, its ``eos_token_ids`` get logit ``-inf``
   (with ``ignore_eos`` EOS does not stop the request, so there is nothing to hold back).
3. **Greedy** (``params.greedy``: temperature below 1e-5): argmax of the logits after steps 1-2.
   Fast path: when no row is sampled, penalised or held by min_tokens, the whole batch is
   one ``argmax`` with no per-row tensor work (the hot decode path).
4. **Random** rows: divide by ``temperature``; **top-k** keeps tokens whose logit is at
   least the k-th largest (ties at the k-th value are kept); **top-p** on the renormalised
   result keeps the smallest highest-probability set whose mass reaches ``top_p`` (a
   token is kept iff the mass strictly above it is ``< top_p``; the best token always
   stays); **min-p** drops tokens with ``prob < min_p * max_prob``; then one exact draw
   from the remaining ``probs``: unseeded rows by the exponential race
   ``argmax(probs / E)``, ``E ~ Exponential(1)`` iid from the sampler's per-device
   generator (``Sampler(seed=...)`` makes it reproducible; ``None`` seeds from the OS).
5. **Seeds**: a row with ``params.seed`` is drawn by inverse CDF with one uniform
   computed in Python from a 64-bit hash of ``(seed, len(output_token_ids))`` alone, so
   no generator state exists to lose: the row draws the same token whatever shares its
   batch, at whatever position, on any device, after preemption, recompute or migration.
6. **Logprobs** (vLLM v1 default, "raw"): ``log_softmax`` of the logits as given, before
   penalties, masks and temperature. Per row that asks: the sampled token's logprob and
   the top ``params.logprobs`` ``(id, logprob)`` pairs, highest first (``0`` gives an
   empty list).

Each ``apply_*`` helper takes logits the caller owns ``[n, V]`` (float32), may write
into them, and returns the processed tensor; tests call them directly.

``Sampler.sample`` and ``logprob_tensors`` never synchronise with the device (async
scheduling reads their results one step later); ``__call__`` does both and reads them.
With async scheduling a row may have one output token still on the device
(``SamplingRow.num_pending``): it counts for min_tokens and seeds, whose rules need only
the count; penalties need the ids, so a row with penalties never has one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tandem.request import SamplingParams

_MASK64 = (1 << 64) - 1
# Smallest positive float32: keeps exponential noise off 0, where probs / E would be
# inf (or nan for a masked token, and argmax prefers nan).
_TINY = torch.finfo(torch.float32).tiny


@dataclass
class SamplingRow:
    """What the sampler needs to know about one request for one step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # generated before this step, ids known
    eos_token_ids: tuple[int, ...]
    num_pending: int = 0  # generated before this step, ids still on the device

    @property
    def num_output(self) -> int:
        return len(self.output_token_ids) + self.num_pending


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    # Per row, when params.logprobs is not None: (logprob of the sampled token,
    # [(token_id, logprob), ...] top-n sorted by logprob descending); else None.
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


class Sampler:
    """Stateless across steps except for the generator of unseeded rows."""

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        # logits: [N, V], one row per SamplingRow.
        if not rows:
            self._check(logits, rows)
            return SamplerOutput(token_ids=[], logprobs=[])
        tokens = self.sample(logits, rows)
        return SamplerOutput(
            token_ids=tokens.tolist(), logprobs=compute_logprobs(logits, rows, tokens)
        )

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """The tokens [N] int64 on the logits' device, without a synchronisation."""
        self._check(logits, rows)
        if all(is_plain_greedy(row) for row in rows):
            return logits.argmax(dim=-1)  # [N]
        return self._sample(logits, rows)

    @staticmethod
    def _check(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")

    def _sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        # A private float32 copy: everything below may write into it.
        work = logits.to(torch.float32, copy=True)  # [N, V]
        penalised = [i for i, row in enumerate(rows) if row.params.has_penalties]
        if any(rows[i].num_pending for i in penalised):
            raise ValueError("penalties need every output id: resolve pending tokens first")
        if penalised:
            index = _on(penalised, work.device)
            work[index] = apply_penalties(work[index], [rows[i] for i in penalised])
        if any(row.params.logit_bias for row in rows):
            work = apply_logit_bias(work, rows)
        work = apply_min_tokens(work, rows)

        random_rows = [i for i, row in enumerate(rows) if not row.params.greedy]
        if len(random_rows) == len(rows):
            return self._draw(work, rows)
        tokens = work.argmax(dim=-1)  # [N]; greedy rows keep these
        if random_rows:
            index = _on(random_rows, work.device)
            drawn = self._draw(work[index], [rows[i] for i in random_rows])
            tokens[index] = drawn
        return tokens

    def _draw(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then one draw per row. No row is greedy."""
        device = logits.device
        logits = logits / _column([row.params.temperature for row in rows], device)
        top_ks = [row.params.top_k for row in rows]
        if any(k is not None for k in top_ks):
            logits = apply_top_k(logits, top_ks)
        if any(row.params.top_p < 1.0 for row in rows):
            logits = apply_top_p(logits, _column([row.params.top_p for row in rows], device))
        if any(row.params.min_p > 0.0 for row in rows):
            logits = apply_min_p(logits, _column([row.params.min_p for row in rows], device))
        probs = logits.softmax(dim=-1)  # [n, V]
        seeded = [i for i, row in enumerate(rows) if row.params.seed is not None]
        if not seeded:
            return self._race(probs)
        uniforms = [seeded_uniform(rows[i].params.seed, rows[i].num_output) for i in seeded]
        if len(seeded) == len(rows):
            return sample_inverse_cdf(probs, uniforms)
        tokens = torch.empty(len(rows), dtype=torch.long, device=device)
        unseeded = [i for i, row in enumerate(rows) if row.params.seed is None]
        seeded_index = _on(seeded, device)
        unseeded_index = _on(unseeded, device)
        tokens[seeded_index] = sample_inverse_cdf(probs[seeded_index], uniforms)
        tokens[unseeded_index] = self._race(probs[unseeded_index])
        return tokens

    def _race(self, probs: torch.Tensor) -> torch.Tensor:
        """One exact draw per row: ``argmax(probs / E)``, ``E ~ Exponential(1)`` iid.

        ``E = -log(1 - U)`` from ``uniform_`` (``exponential_`` is several times slower on CPU).
        """
        noise = torch.empty_like(probs).uniform_(0.0, 1.0, generator=self._generator(probs.device))
        noise = torch.log1p(noise.neg_()).neg_().clamp_min_(_TINY)
        return probs.div_(noise).argmax(dim=-1)

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()
            else:
                generator.manual_seed(self._seed & _MASK64)
            self._generators[device] = generator
        return generator


def is_plain_greedy(row: SamplingRow) -> bool:
    """Its token is the plain argmax of its logits (no penalty, bias or min_tokens mask)."""
    params = row.params
    return (
        params.greedy
        and not params.has_penalties
        and not params.logit_bias
        and row.num_output >= params.min_tokens
    )


def _column(values: list[float], device: torch.device) -> float | torch.Tensor:
    """A scalar when every row agrees (the common case), else a ``[n, 1]`` tensor."""
    first = values[0]
    if all(v == first for v in values):
        return first
    return _on(values, device, torch.float32).unsqueeze(1)


def _on(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor of ``values`` on ``device`` without a blocking copy (which would first wait
    for every iteration queued on the device: ``tandem.runner.inputs.device_tensor``)."""
    t = torch.tensor(values, dtype=dtype)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seeded_uniform(seed: int, step: int) -> float:
    """The uniform in ``[0, 1)`` that picks a seeded row's token at output position ``step``."""
    mixed = _splitmix64((_splitmix64(seed & _MASK64) + step) & _MASK64)
    return (mixed >> 11) / float(1 << 53)


def sample_inverse_cdf(probs: torch.Tensor, uniforms: Sequence[float]) -> torch.Tensor:
    """Per row, the first token whose cumulative probability exceeds ``u * total``.

    Needs one number per row (no ``[n, V]`` noise to build or copy to the device); float64
    keeps the cumulative sum exact enough over large vocabularies.
    """
    cdf = probs.to(torch.float64).cumsum(dim=-1)  # [n, V]
    u = _on(uniforms, probs.device, torch.float64)
    target = (u * cdf[:, -1]).unsqueeze(1)  # [n, 1]
    # right=True: cdf[i - 1] <= target < cdf[i], so the token has mass, except that
    # u * total may round up to total (index V): fall back to the last token with mass.
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)
    vocab = probs.shape[1]
    last = vocab - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(dim=-1)
    return torch.minimum(tokens, last)


def _bin_counts(token_lists: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """``[n, V]`` float32 count of each token id in each row's list."""
    width = max((len(tokens) for tokens in token_lists), default=0)
    counts = torch.zeros(len(token_lists), vocab + 1, dtype=torch.float32, device=device)
    if width:
        # Pad with the id ``vocab``: it lands in the extra column, dropped below, as do
        # ids the logits have no column for.
        padded = [list(tokens) + [vocab] * (width - len(tokens)) for tokens in token_lists]
        index = _on(padded, device, torch.long).clamp_(max=vocab)
        counts.scatter_add_(1, index, torch.ones(index.shape, device=device))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition over prompt + output, then frequency and presence over output tokens."""
    n, vocab = logits.shape
    device = logits.device
    output_counts = _bin_counts([row.output_token_ids for row in rows], vocab, device)  # [n, V]
    in_output = output_counts > 0
    in_prompt = _bin_counts([row.prompt_token_ids for row in rows], vocab, device) > 0

    def per_row(values: list[float]) -> torch.Tensor:
        return _on(values, device, torch.float32).view(n, 1)

    repetition = per_row([row.params.repetition_penalty for row in rows])
    scale = torch.where(in_prompt | in_output, repetition, 1.0)  # [n, V]
    logits = torch.where(logits > 0, logits / scale, logits * scale)
    logits -= per_row([row.params.frequency_penalty for row in rows]) * output_counts
    logits -= per_row([row.params.presence_penalty for row in rows]) * in_output
    return logits


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Add each row's ``logit_bias`` to its tokens' logits, in place (one scatter)."""
    vocab = logits.shape[1]
    row_index: list[int] = []
    token_index: list[int] = []
    values: list[float] = []
    for i, row in enumerate(rows):
        for token, bias in row.params.logit_bias:
            if token < vocab:
                row_index.append(i)
                token_index.append(token)
                values.append(float(bias))
    if row_index:
        index = _on([row_index, token_index], logits.device)
        logits.index_put_((index[0], index[1]), _on(values, logits.device, logits.dtype),
                          accumulate=True)  # fmt: skip
    return logits


def apply_min_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Hold back EOS (unless ignore_eos) and stop token ids until min_tokens is reached."""
    vocab = logits.shape[1]
    row_index: list[int] = []
    token_index: list[int] = []
    for i, row in enumerate(rows):
        params = row.params
        if row.num_output >= params.min_tokens:
            continue
        banned = set(params.stop_token_ids)
        if not params.ignore_eos:
            banned.update(row.eos_token_ids)
        for token in banned:
            if 0 <= token < vocab:
                row_index.append(i)
                token_index.append(token)
    if row_index:
        index = _on([row_index, token_index], logits.device)
        logits[index[0], index[1]] = float("-inf")
    return logits


def apply_top_k(logits: torch.Tensor, top_ks: Sequence[int | None]) -> torch.Tensor:
    """Keep logits >= each row's k-th largest; ``None`` leaves the row alone."""
    vocab = logits.shape[1]
    k_max = min(max(k for k in top_ks if k is not None), vocab)
    top = logits.topk(k_max, dim=-1).values  # [n, k_max], descending
    if all(k == top_ks[0] for k in top_ks):
        return logits.masked_fill(logits < top[:, -1:], float("-inf"))
    device = logits.device
    k_index = _on([min(k or k_max, k_max) - 1 for k in top_ks], device)
    kth = top.gather(1, k_index.unsqueeze(1))  # [n, 1]
    active = _on([k is not None for k in top_ks], device).unsqueeze(1)
    return logits.masked_fill((logits < kth) & active, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Keep the smallest highest-probability set whose mass reaches ``top_p`` (>= 1 token)."""
    ordered, order = logits.sort(dim=-1, descending=True)  # [n, V]
    probs = ordered.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs  # exactly 0 for the best token
    drop = mass_above >= top_p
    if isinstance(top_p, torch.Tensor):
        drop &= top_p < 1.0  # rows with top_p == 1 keep every token, whatever the rounding
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ordered)


def apply_min_p(logits: torch.Tensor, min_p: float | torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the row's best."""
    probs = logits.softmax(dim=-1)  # [n, V]
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


@dataclass
class LogprobTensors:
    """``logprob_tensors``' result: still on the device (or being copied off it)."""

    wanted: list[int]  # rows that asked for logprobs
    counts: list[int]  # top-n per wanted row
    sampled: torch.Tensor  # [w] float32
    top_values: torch.Tensor | None  # [w, n_max] float32
    top_ids: torch.Tensor | None  # [w, n_max] int64

    def to_host(self, non_blocking: bool) -> LogprobTensors:
        """Copies in pinned memory (CUDA): complete once the stream reaches this point."""

        def off(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None or not t.is_cuda:
                return t
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return host.copy_(t, non_blocking=non_blocking)

        return LogprobTensors(
            self.wanted, self.counts, off(self.sampled), off(self.top_values), off(self.top_ids)
        )

    def lists(self, num_rows: int) -> list[tuple[float, list[tuple[int, float]]] | None]:
        result: list[tuple[float, list[tuple[int, float]]] | None] = [None] * num_rows
        sampled = self.sampled.tolist()
        top_values: list[list[float]] = [[] for _ in self.wanted]
        top_ids: list[list[int]] = [[] for _ in self.wanted]
        if self.top_values is not None and self.top_ids is not None:
            top_values, top_ids = self.top_values.tolist(), self.top_ids.tolist()
        for j, (i, n) in enumerate(zip(self.wanted, self.counts, strict=True)):
            result[i] = (sampled[j], list(zip(top_ids[j][:n], top_values[j][:n], strict=True)))
        return result


def logprob_tensors(
    logits: torch.Tensor, rows: Sequence[SamplingRow], tokens: torch.Tensor
) -> LogprobTensors | None:
    """Raw logprobs (before any processing) of the sampled tokens and the top-n, on the
    device; None when no row asks for them."""
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not wanted:
        return None
    index = _on(wanted, logits.device)
    logprobs = torch.log_softmax(logits[index].float(), dim=-1)  # [w, V]
    sampled = logprobs.gather(1, tokens[index].unsqueeze(1)).squeeze(1)
    counts = [rows[i].params.logprobs or 0 for i in wanted]
    top_values = top_ids = None
    if max(counts):
        top = logprobs.topk(min(max(counts), logprobs.shape[1]), dim=-1)  # sorted descending
        top_values, top_ids = top.values, top.indices
    return LogprobTensors(wanted, counts, sampled, top_values, top_ids)


def compute_logprobs(
    logits: torch.Tensor, rows: Sequence[SamplingRow], tokens: torch.Tensor
) -> list[tuple[float, list[tuple[int, float]]] | None]:
    """Raw logprobs (before any processing) of the sampled tokens and the top-n."""
    lp = logprob_tensors(logits, rows, tokens)
    return [None] * len(rows) if lp is None else lp.lists(len(rows))
