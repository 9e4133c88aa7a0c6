"""Synthetic workloads: request lengths and arrival times (pure; numpy only).

Length distributions follow the published statistics of two public traces, as reported
in the vLLM paper (Kwon et al., SOSP 2023, section 6.1):

=============  ==================  ===================
trace          mean input tokens   mean output tokens
=============  ==================  ===================
ShareGPT       161.3               338.0
Alpaca         19.3                58.5
=============  ==================  ===================

Both are right-skewed with heavy output tails, so lengths are log-normal with the
published mean (median = mean / exp(σ²/2)), clipped to [1, max_len].

Outputs are not independent of prompts in real traces: requests of the same kind
(summarise, translate, chat, code) have similar output lengths. To model that, each
request draws one of ``num_templates`` task templates; a template scales the output
median by a log-normal factor (σ_template) and contributes a fixed token prefix to the
prompt, and the request's own output varies around the template median (σ_within). The
marginal spread sqrt(σ_template² + σ_within²) matches the single-σ description above.
This is what an online length predictor (ALISE) can learn from, as it can from real data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LengthSpec:
    name: str
    input_mean: float
    input_sigma: float
    output_mean: float
    output_sigma_template: float
    output_sigma_within: float


WORKLOADS = {
    "sharegpt-like": LengthSpec("sharegpt-like", 161.3, 1.0, 338.0, 0.8, 0.55),
    "alpaca-like": LengthSpec("alpaca-like", 19.3, 0.7, 58.5, 0.6, 0.45),
}


@dataclass(frozen=True)
class SyntheticRequest:
    prompt_token_ids: list[int]
    output_len: int
    template: int


def sample_requests(
    workload: str,
    n: int,
    seed: int = 0,
    vocab_size: int = 32000,
    max_input_len: int = 2048,
    max_output_len: int = 2048,
    num_templates: int = 64,
    template_prefix_len: int = 8,
) -> list[SyntheticRequest]:
    try:
        spec = WORKLOADS[workload]
    except KeyError:
        raise ValueError(
            f"unknown workload {workload!r}; available: {', '.join(WORKLOADS)}"
        ) from None
    rng = np.random.default_rng(seed)
    sigma_out = math.hypot(spec.output_sigma_template, spec.output_sigma_within)
    out_median = spec.output_mean / math.exp(sigma_out**2 / 2)
    in_median = spec.input_mean / math.exp(spec.input_sigma**2 / 2)
    template_scale = rng.lognormal(0.0, spec.output_sigma_template, num_templates)
    template_prefix = rng.integers(16, vocab_size, (num_templates, template_prefix_len))
    templates = rng.integers(0, num_templates, n)
    in_lens = np.clip(
        rng.lognormal(math.log(in_median), spec.input_sigma, n), 1, max_input_len
    ).astype(int)
    out_lens = np.clip(
        rng.lognormal(np.log(out_median * template_scale[templates]), spec.output_sigma_within),
        1,
        max_output_len,
    ).astype(int)
    requests = []
    for t, n_in, n_out in zip(templates, in_lens, out_lens, strict=True):
        prefix = template_prefix[t, : min(template_prefix_len, n_in)].tolist()
        body = rng.integers(16, vocab_size, n_in - len(prefix)).tolist()
        requests.append(SyntheticRequest(prefix + body, int(n_out), int(t)))
    return requests


def poisson_arrivals(n: int, rate: float, seed: int = 0, burstiness: float = 1.0) -> np.ndarray:
    """``n`` arrival times (seconds from 0) at ``rate`` requests/s.

    Inter-arrival gaps are gamma distributed with shape ``burstiness`` and mean 1/rate:
    1.0 is Poisson; below 1 is burstier, above 1 smoother (as vLLM's benchmark does).
    """
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be > 0")
    rng = np.random.default_rng(seed + 1)
    gaps = rng.gamma(burstiness, 1.0 / (rate * burstiness), n)
    return np.cumsum(gaps)
