"""Serving throughput on one GPU: Tandem (colocated) against transformers, with the floor.

One workload — ``--num-requests`` prompts of random token ids in [10, 30000) (seeded), all
submitted at once, fixed output lengths (``ignore_eos``) — runs through up to three systems,
one after another in this process, on the same model shape (``random:NAME``, random bf16
weights; values do not change the work when lengths are fixed):

- ``tandem``:    ``LLMEngine`` in-process (``build_engine_config``, policy ``fcfs`` by default:
  no start-up cost-model profiling). Warmed up with a few short requests first (CUDA graphs
  are captured in the runner constructor; Triton compiles on first use). The time of each
  new token is taken when ``step()`` returns it (``RequestOutput.new_token_ids``).
- ``hf-cb``:     transformers continuous batching, ``model.generate_batch`` (paged attention:
  the first of ``--hf-cb-attn`` that the model accepts and that completes the warm-up
  requests; CUDA graphs via ``ContinuousBatchingConfig(use_cuda_graph=True)``, falling back
  to transformers' own choice if that fails; ``auto_switch_to_flash=False`` where the field
  exists), per-token timestamps from ``record_timestamps=True``, EOS disabled
  (``eos_token_id`` -1) and every output length checked. The timed span starts at the first
  request's ``created_time`` (after the manager's own CUDA-graph warm-up, which like
  Tandem's capture is a one-time start-up cost); the whole call's wall time is recorded too.
  Workloads with varied output lengths go through ``continuous_batching_context_manager``
  and ``add_request(max_new_tokens=...)`` per request instead (``generate_batch`` takes one
  length for all).
- ``hf-static``: transformers ``generate`` on left-padded batches (sdpa), all requests in one
  batch unless ``--hf-batch-size`` (on out-of-memory the batch is halved and the run
  restarted; the size used is recorded). A batch runs to its longest output; only the
  requests' own output tokens count. TPOT = (batch time - prefill time) / (L - 1), the
  prefill time measured by a separate ``max_new_tokens=1`` call on the same batch.

Per system: output tokens/s = output tokens / makespan (first request added to last
token), TPOT per request = (t_last - t_first) / (n_out - 1) with p50/p99 over requests,
TTFT p50/p99, makespan. A failing system (an API mismatch, out of memory) is reported
with its traceback and recorded as ``{"error": ...}``; the others still run.

The workload's floor, from limits measured in the same run (``bench/gpu_common``): prefill
= sum over requests of [in x (linear FLOPs per token - LM head) + LM head (last token only)
+ causal attention FLOPs] / bf16 matmul rate; decode = for each iteration k = 1 .. max(out)
- 1 over the requests still running (out > k): (weights read + KV of in + k tokens each) /
copy bandwidth. floor tokens/s = output tokens / (prefill + decode). Target: Tandem at >= 75%
of the floor's throughput (issue 13; it was 60% in issue 9). Tandem runs with async
scheduling (the default on CUDA); ``--sync-too`` adds ``tandem-sync``, the same engine with
``async_scheduling=False``, in the same run.

Workloads: ``uniform`` (input lengths uniform in [--min-input, --max-input], output
--output-len) or ``sharegpt-like`` (lengths from ``loadgen.workloads.sample_requests``,
log-normal with ShareGPT's published means, clipped to 1024 in / 512 out; token ids drawn
here, as for ``uniform``).

    PYTHONPATH=. python bench/gpu_serving.py                              # Llama-3-8B, 256 requests
    PYTHONPATH=. python bench/gpu_serving.py --workload sharegpt-like --systems tandem,hf-cb
    PYTHONPATH=. python bench/gpu_serving.py --device cpu --model llama-3-debug \\
        --num-requests 4 --output-len 4 --min-input 8 --max-input 32 --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import gpu_common as g

SYSTEMS = ("tandem", "hf-cb", "hf-static")
TOKEN_LOW, TOKEN_HIGH = 10, 30000
SHAREGPT_MAX_INPUT, SHAREGPT_MAX_OUTPUT = 1024, 512
TARGET_FLOOR_RATIO = 0.75
HF_CB_ATTN = "paged|sdpa,sdpa_paged,paged_attention,sdpa"
PAD_ID = 0


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def input_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]

    def describe(self) -> dict[str, Any]:
        ins, outs = np.array(self.input_lens), np.array(self.output_lens)
        return dict(
            num_requests=len(self.prompts), input_tokens=int(ins.sum()),
            output_tokens=int(outs.sum()), input_mean=float(ins.mean()),
            input_min=int(ins.min()), input_max=int(ins.max()), output_mean=float(outs.mean()),
            output_min=int(outs.min()), output_max=int(outs.max()),
        )  # fmt: skip


class SystemTimeout(BaseException):
    """Raised by ``--timeout-per-system``; a BaseException so that transformers'
    ``except Exception`` inside ``generate_batch`` does not swallow it."""


# ------------------------------------------------------------------ workload and floor
def make_workload(
    kind: str, n: int, seed: int, min_input: int, max_input: int, output_len: int, vocab: int
) -> Workload:
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        in_lens = rng.integers(min_input, max_input + 1, n).tolist()
        out_lens = [output_len] * n
    elif kind == "sharegpt-like":
        from loadgen.workloads import sample_requests  # pure numpy, no side effects

        reqs = sample_requests(
            "sharegpt-like", n, seed=seed, vocab_size=TOKEN_HIGH,
            max_input_len=SHAREGPT_MAX_INPUT, max_output_len=SHAREGPT_MAX_OUTPUT,
        )  # fmt: skip
        in_lens = [len(r.prompt_token_ids) for r in reqs]
        out_lens = [r.output_len for r in reqs]
    else:
        raise ValueError(f"unknown workload {kind!r}")
    high = min(TOKEN_HIGH, vocab)
    prompts = [rng.integers(TOKEN_LOW, high, int(m)).tolist() for m in in_lens]
    return Workload(prompts, [int(o) for o in out_lens])


def workload_floor(
    cfg: Any, input_lens: list[int], output_lens: list[int], peak_tflops: float, copy_Bps: float
) -> dict[str, Any]:
    """Prefill at the matmul rate plus decode at the copy bandwidth (see the docstring)."""
    head = 2 * cfg.vocab_size * cfg.hidden_size
    per_token = g.linear_flops_per_token(cfg) - head
    prefill_flops = sum(n * per_token + head + g.attention_flops(cfg, n) for n in input_lens)
    prefill_s = prefill_flops / (peak_tflops * 1e12)
    ins, outs = np.array(input_lens, dtype=np.int64), np.array(output_lens, dtype=np.int64)
    kv_tok = g.kv_bytes_per_token(cfg)
    decode_bytes, iterations = 0, 0
    for k in range(1, int(outs.max())):
        running = outs > k
        batch = int(running.sum())
        decode_bytes += g.weight_bytes(cfg, batch) + (int(ins[running].sum()) + k * batch) * kv_tok
        iterations += 1
    decode_s = decode_bytes / copy_Bps
    floor_s = prefill_s + decode_s
    return dict(
        matmul_tflops=peak_tflops, copy_bandwidth_Bps=copy_Bps, prefill_flops=prefill_flops,
        prefill_s=prefill_s, decode_iterations=iterations, decode_bytes=decode_bytes,
        decode_s=decode_s, floor_s=floor_s, output_tokens=int(outs.sum()),
        output_tokens_per_s=int(outs.sum()) / floor_s,
    )  # fmt: skip


def measure_limits(device: str, peak: float | None, bw_gbs: float | None) -> tuple[float, float]:
    """(bf16 matmul TFLOP/s, copy bytes/s): measured unless given; on CPU a rough timing."""
    if device.startswith("cuda"):
        peak = peak if peak is not None else g.matmul_tflops(device)
        bw = bw_gbs * 1e9 if bw_gbs is not None else g.copy_bandwidth(device)
        torch.cuda.empty_cache()
        return peak, bw
    if peak is None:
        a = torch.randn(512, 512)
        peak = 2 * 512**3 / _best_of(lambda: a @ a, 5) / 1e12
    if bw_gbs is None:
        src = torch.empty(64 * 2**20, dtype=torch.uint8)
        dst = torch.empty_like(src)
        return peak, 2 * src.numel() / _best_of(lambda: dst.copy_(src), 5)
    return peak, bw_gbs * 1e9


def _best_of(fn: Callable[[], Any], iters: int) -> float:
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ------------------------------------------------------------------ metrics and helpers
def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def summarize(times: list[list[float]], start: float, end: float) -> dict[str, Any]:
    """Throughput and latency from each request's token times (perf_counter seconds)."""
    n_out = sum(len(t) for t in times)
    ttft = [(t[0] - start) * 1e3 for t in times if t]
    tpot = [(t[-1] - t[0]) / (len(t) - 1) * 1e3 for t in times if len(t) > 1]
    makespan = end - start
    return dict(
        output_tokens=n_out, makespan_s=makespan, output_tokens_per_s=n_out / makespan,
        tpot_ms_p50=pct(tpot, 50), tpot_ms_p99=pct(tpot, 99),
        tpot_ms_mean=float(np.mean(tpot)) if tpot else None,
        ttft_ms_p50=pct(ttft, 50), ttft_ms_p99=pct(ttft, 99),
    )  # fmt: skip


def check_lengths(system: str, got: list[int], want: list[int]) -> None:
    bad = [(i, a, b) for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
    if bad:
        raise RuntimeError(f"{system}: {len(bad)} requests have the wrong output length "
                           f"(index, got, want): {bad[:5]}")  # fmt: skip


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        print(f"  device memory allocated after cleanup: "
              f"{torch.cuda.memory_allocated(torch.device(device)) / 2**30:.1f} GiB", flush=True)  # fmt: skip


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise SystemTimeout(f"took longer than --timeout-per-system {seconds:g} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def guarded(name: str, timeout: float, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    print(f"\n== {name}", flush=True)
    try:
        with time_limit(timeout):
            result = fn()
    except (Exception, SystemTimeout) as e:
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    if "output_tokens_per_s" in result:
        print(f"  {result['output_tokens_per_s']:.0f} output tok/s, makespan "
              f"{result['makespan_s']:.2f} s, TPOT p50 {_fmt(result.get('tpot_ms_p50'), 1)} ms",
              flush=True)  # fmt: skip
    return result


def _fmt(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def prepare_model(name: str, layers: int | None) -> tuple[str, Any, str | None]:
    """(folder, ModelConfig, temp dir to remove). With ``layers``, a copy of the resolved
    ``random:NAME`` folder (marker and tokenizer kept) whose config has that many layers."""
    folder, cfg = g.model_config(name, layers)
    if not layers:
        return folder, cfg, None
    tmp = tempfile.mkdtemp(prefix="gpu_serving-")
    dst = Path(tmp) / Path(folder).name
    shutil.copytree(folder, dst)
    hf = json.loads((dst / "config.json").read_text())
    hf["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(hf, indent=2))
    return str(dst), cfg, tmp


# ------------------------------------------------------------------ tandem
def drive_engine(engine: Any, wl: Workload) -> dict[str, Any]:
    from tandem.request import SamplingParams

    steps0 = engine.num_iterations
    start = time.perf_counter()
    ids = [
        engine.add_request(
            p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        ).request_id
        for p, n in zip(wl.prompts, wl.output_lens, strict=True)
    ]
    times: dict[str, list[float]] = {rid: [] for rid in ids}
    preemptions: dict[str, int] = {}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for o in outputs:
            times[o.request_id].extend([now] * len(o.new_token_ids))
            preemptions[o.request_id] = o.num_preemptions
    end = time.perf_counter()
    per_request = [times[rid] for rid in ids]
    check_lengths("tandem", [len(t) for t in per_request], wl.output_lens)
    out = summarize(per_request, start, end)
    out.update(steps=engine.num_iterations - steps0, preemptions=sum(preemptions.values()))
    return out


def run_tandem(args: argparse.Namespace, folder: str, policy: str, wl: Workload,
               warm: Workload, async_scheduling: bool | None = None) -> dict[str, Any]:  # fmt: skip
    from tandem.engine.llm import build_engine_config
    from tandem.engine.llm_engine import LLMEngine

    t0 = time.perf_counter()
    config = build_engine_config(
        model=folder, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, policy=policy,
        kv_blocks=args.kv_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
        async_scheduling=async_scheduling,
    )  # fmt: skip
    engine = LLMEngine(config)
    build_s = time.perf_counter() - t0
    print(f"  engine built in {build_s:.1f} s: {config.cache.num_blocks} KV blocks of "
          f"{config.cache.block_size}, attention {engine.runner.backend.name}, "
          f"CUDA graphs {engine.runner.graphs is not None}", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    drive_engine(engine, warm)
    warmup_s = time.perf_counter() - t0
    sync(args.device)
    result = drive_engine(engine, wl)
    result.update(
        policy=policy, build_s=build_s, warmup_s=warmup_s, kv_blocks=config.cache.num_blocks,
        block_size=config.cache.block_size, attention=engine.runner.backend.name,
        cuda_graphs=engine.runner.graphs is not None, max_num_seqs=args.max_num_seqs,
        async_scheduling=engine.async_scheduling,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )  # fmt: skip
    return result


# ------------------------------------------------------------------ transformers
def build_hf_model(folder: str, device: str, dtype: str) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(
                config, dtype=getattr(torch, dtype), attn_implementation="sdpa"
            )
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_config(
                config, torch_dtype=getattr(torch, dtype), attn_implementation="sdpa"
            )
    model = model.to(device).eval()
    print(f"  transformers model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B "
          f"params on {next(model.parameters()).device}", flush=True)  # fmt: skip
    return model


def _accepts(fn: Any, name: str) -> bool:
    """``name`` is an explicit parameter of ``fn`` (not merely swallowed by ``**kwargs``)."""
    return name in inspect.signature(fn).parameters


def cb_options(graphs: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(kwargs for generate_batch / the context manager, what was set): a
    ContinuousBatchingConfig with CUDA graphs ``on``/``off``/``auto`` and no silent switch
    to flash. Without that class, ``use_cuda_graph`` goes on the GenerationConfig if it has
    the field."""
    try:
        from transformers.generation import ContinuousBatchingConfig
    except ImportError:
        if graphs == "auto":
            return {}, {"continuous_batching_config": None}
        return {"gen:use_cuda_graph": graphs == "on"}, {"generation_config.use_cuda_graph": graphs}
    fields = inspect.signature(ContinuousBatchingConfig).parameters
    kw: dict[str, Any] = {}
    if "use_cuda_graph" in fields and graphs != "auto":
        kw["use_cuda_graph"] = graphs == "on"
    if "auto_switch_to_flash" in fields:
        kw["auto_switch_to_flash"] = False  # keep the implementation asked for
    cb = ContinuousBatchingConfig(**kw)
    return {"continuous_batching_config": cb}, {"continuous_batching_config": kw}


def cb_generate(model: Any, wl: Workload, cb_kwargs: dict[str, Any]) -> dict[str, Any]:
    """One continuous-batching run; raises unless every request has its output length."""
    from transformers import GenerationConfig

    cb_kwargs = dict(cb_kwargs)
    longest = max(wl.output_lens)
    # eos_token_id None becomes -1 (no EOS) in init_continuous_batching; min_new_tokens too.
    gen = GenerationConfig(
        max_new_tokens=longest, min_new_tokens=longest, do_sample=False, eos_token_id=None
    )
    for key in [k for k in cb_kwargs if k.startswith("gen:")]:
        value = cb_kwargs.pop(key)
        if hasattr(gen, key[4:]):
            setattr(gen, key[4:], value)
    if len(set(wl.output_lens)) == 1:
        api = "generate_batch"
        kwargs: dict[str, Any] = {"generation_config": gen}
        for key, value in [
            *cb_kwargs.items(),
            ("record_timestamps", True),
            ("progress_bar", False),
        ]:
            if _accepts(model.generate_batch, key):
                kwargs[key] = value
        t0 = time.perf_counter()
        results = list(model.generate_batch(inputs=wl.prompts, **kwargs).values())
        t1 = time.perf_counter()
    else:
        api = "continuous_batching_context_manager + add_request(max_new_tokens=out_i)"
        cm = model.continuous_batching_context_manager
        kwargs = {"generation_config": gen, "block": True, "timeout": 5}
        kwargs.update({k: v for k, v in cb_kwargs.items() if _accepts(cm, k)})
        if _accepts(cm, "workload_hints"):
            from transformers.generation.continuous_batching.utils import WorkloadHints

            kwargs["workload_hints"] = WorkloadHints(
                max_prompt_length=max(wl.input_lens), max_generated_length=longest,
                num_requests=len(wl.prompts),
            )  # fmt: skip
        t0 = time.perf_counter()
        with torch.no_grad(), cm(**kwargs) as manager:
            for i, (p, n) in enumerate(zip(wl.prompts, wl.output_lens, strict=True)):
                manager.add_request(input_ids=p, request_id=f"r{i}", max_new_tokens=n,
                                    record_timestamps=True)  # fmt: skip
            done: dict[str, Any] = {}
            while len(done) < len(wl.prompts):
                r = manager.get_result(timeout=1)
                if r is not None and r.is_finished():
                    done[r.request_id] = r
                elif r is None and not manager.is_running():
                    raise RuntimeError("the continuous batching thread stopped early")
        t1 = time.perf_counter()
        results = [done[f"r{i}"] for i in range(len(wl.prompts))]
    by_prompt = {tuple(r.prompt_ids): r for r in results}
    missing = [i for i, p in enumerate(wl.prompts) if tuple(p) not in by_prompt]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(wl.prompts)} requests came back without a "
                           "result (transformers logged why above)")  # fmt: skip
    ordered = [by_prompt[tuple(p)] for p in wl.prompts]
    errors = [r.error for r in ordered if getattr(r, "error", None)]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    check_lengths("hf-cb", [len(r.generated_tokens) for r in ordered], wl.output_lens)
    stamps = [getattr(r, "timestamps", None) for r in ordered]
    created = [getattr(r, "created_time", None) for r in ordered]
    start = min(created) if None not in created else t0
    if all(s for s in stamps):
        times = [s[:n] for s, n in zip(stamps, wl.output_lens, strict=True)]
        out = summarize(times, start, max(t[-1] for t in times))
        out["tpot_source"] = "per-token timestamps (record_timestamps)"
    else:  # no per-token times: throughput only
        ends = [r.lifespan[1] for r in ordered if getattr(r, "lifespan", (-1, -1))[1] > 0]
        end = max(ends) if len(ends) == len(ordered) else t1
        n_out = sum(wl.output_lens)
        out = dict(output_tokens=n_out, makespan_s=end - start,
                   output_tokens_per_s=n_out / (end - start), tpot_ms_p50=None, tpot_ms_p99=None,
                   ttft_ms_p50=None, tpot_source="none: no per-token timestamps")  # fmt: skip
    out.update(api=api, call_wall_s=t1 - t0, output_tokens_per_s_call_wall=sum(wl.output_lens) / (t1 - t0),
               timing_start="first request's created_time" if start != t0 else "call start")  # fmt: skip
    return out


def run_hf_cb(args: argparse.Namespace, model: Any, wl: Workload, warm: Workload) -> dict[str, Any]:
    """Tries (attn_implementation, CUDA graphs) pairs on the warm-up requests, in order
    (graphs ``on`` falls back to ``auto``), then times the workload with the first that works."""
    if not hasattr(model, "generate_batch"):
        raise RuntimeError("this transformers has no generate_batch")
    switches: list[str] = []  # what the manager itself switches the model to
    original_set = model.set_attn_implementation

    def spy(impl: Any, *a: Any, **k: Any) -> Any:
        switches.append(str(impl))
        return original_set(impl, *a, **k)

    graph_opts = ["on", "auto"] if args.hf_cb_cuda_graph == "on" else [args.hf_cb_cuda_graph]
    pairs = [(c, gr) for c in args.hf_cb_attn.split(",") if c for gr in graph_opts]
    tried: dict[str, str] = {}
    chosen: tuple[str, str, str] | None = None
    try:
        for cand, graphs in pairs:
            label = f"{cand} / cuda graphs {graphs}"
            try:
                original_set(cand)
                set_to = str(model.config._attn_implementation)
                model.set_attn_implementation = spy
                t0 = time.perf_counter()
                cb_generate(model, warm, cb_options(graphs)[0])  # warm-up and a check
                chosen = (cand, graphs, set_to)
                print(f"  {label} works (config: {set_to!r}); warm-up "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
                break
            except Exception as e:
                tried[label] = f"{type(e).__name__}: {e}"
                print(f"  {label} failed: {tried[label]}", flush=True)
            finally:
                model.__dict__.pop("set_attn_implementation", None)
                gc.collect()
        if chosen is None:
            raise RuntimeError(f"no attn_implementation worked: {tried}")
        cb_kwargs, cb_set = cb_options(chosen[1])
        switches.clear()
        model.set_attn_implementation = spy
        free_memory(args.device)
        result = cb_generate(model, wl, cb_kwargs)
    finally:
        model.__dict__.pop("set_attn_implementation", None)
        try:
            original_set("sdpa")
        except Exception as e:  # noqa: BLE001 - reported, static generate may still run
            print(f"  could not set sdpa back: {e}", flush=True)
    result.update(
        attn_implementation=chosen[0], attn_implementation_in_config=chosen[2],
        attn_implementation_switched_by_transformers=switches[:1] or None,
        cuda_graphs_option=chosen[1], failed_attempts=tried, **cb_set,
    )  # fmt: skip
    return result


def static_generate(model: Any, prompts: list[list[int]], new_tokens: int, device: str) -> float:
    """Seconds for one left-padded batch through ``generate``; checks the output width."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD_ID,
    )  # fmt: skip
    sync(device)
    elapsed = time.perf_counter() - t0
    if out.shape[1] != width + new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1] - width} new tokens, not {new_tokens}")
    return elapsed


def static_timed(model: Any, wl: Workload, batch_size: int, device: str) -> dict[str, Any]:
    n = len(wl.prompts)
    batches = [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    spans = []
    start = time.perf_counter()
    for b in batches:
        t0 = time.perf_counter() - start
        longest = max(wl.output_lens[i] for i in b)
        spans.append(
            (t0, static_generate(model, [wl.prompts[i] for i in b], longest, device), longest)
        )
    end = time.perf_counter()
    tpot, ttft = [], []
    prefill = []
    for b, (offset, total, longest) in zip(batches, spans, strict=True):
        first = static_generate(model, [wl.prompts[i] for i in b], 1, device)
        prefill.append(first)
        ttft += [(offset + first) * 1e3] * len(b)
        if longest > 1:
            tpot += [(total - first) / (longest - 1) * 1e3] * len(b)
    n_out = sum(wl.output_lens)
    return dict(
        output_tokens=n_out, makespan_s=end - start, output_tokens_per_s=n_out / (end - start),
        tpot_ms_p50=pct(tpot, 50), tpot_ms_p99=pct(tpot, 99),
        tpot_ms_mean=float(np.mean(tpot)) if tpot else None,
        ttft_ms_p50=pct(ttft, 50), ttft_ms_p99=pct(ttft, 99), batch_size=batch_size,
        num_batches=len(batches), batch_s=[s[1] for s in spans], prefill_s=prefill,
        tpot_source="(batch time - separate max_new_tokens=1 time) / (L - 1)",
    )  # fmt: skip


def run_hf_static(
    args: argparse.Namespace, model: Any, wl: Workload, warm: Workload
) -> dict[str, Any]:
    if model.config._attn_implementation != "sdpa":
        model.set_attn_implementation("sdpa")
    static_generate(model, warm.prompts, 4, args.device)  # warm-up
    batch_size = args.hf_batch_size or len(wl.prompts)
    ooms = []
    while True:
        oom = False
        try:
            result = static_timed(model, wl, batch_size, args.device)
        except torch.cuda.OutOfMemoryError:
            oom = True
        if not oom:
            break
        free_memory(args.device)
        ooms.append(batch_size)
        if batch_size == 1:
            raise RuntimeError("out of memory even with batch size 1")
        print(f"  out of memory at batch size {batch_size}; halving", flush=True)
        batch_size //= 2
    result.update(attn_implementation=model.config._attn_implementation, oom_batch_sizes=ooms)
    return result


# ------------------------------------------------------------------ report
def table(results: dict[str, dict[str, Any]], floor: dict[str, Any]) -> str:
    ref = results.get("hf-cb", {}).get("output_tokens_per_s")
    lines = [
        "| system | output tok/s | share of floor tok/s | x hf-cb | TPOT p50 ms | TPOT p99 ms "
        "| TTFT p50 s | makespan s |",
        "|---|---|---|---|---|---|---|---|",
        f"| floor | {floor['output_tokens_per_s']:.0f} | 1.00 | "
        f"{_fmt(floor['output_tokens_per_s'] / ref if ref else None, 2)} | | | | {floor['floor_s']:.2f} |",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:80]} | | | | | | |")
            continue
        tps = r["output_tokens_per_s"]
        ttft = r.get("ttft_ms_p50")
        lines.append(
            f"| {name} | {tps:.0f} | {tps / floor['output_tokens_per_s']:.2f} | "
            f"{_fmt(tps / ref if ref else None, 2)} | {_fmt(r.get('tpot_ms_p50'), 1)} | "
            f"{_fmt(r.get('tpot_ms_p99'), 1)} | {_fmt(ttft / 1e3 if ttft is not None else None, 2)} "
            f"| {r['makespan_s']:.2f} |"
        )
    return "\n".join(lines)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0], "torch": torch.__version__}
    for mod in ("transformers", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="llama-3-8b", help="a tandem/model_configs name")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the model's")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--workload", choices=("uniform", "sharegpt-like"), default="uniform")
    ap.add_argument("--min-input", type=int, default=64)
    ap.add_argument("--max-input", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma list of " + ", ".join(SYSTEMS)
    )
    ap.add_argument("--skip-transformers", action="store_true", help="same as --systems tandem")
    ap.add_argument(
        "--policies", default="fcfs", help="Tandem policies, comma list (fcfs, mlfq, ...)"
    )
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--kv-blocks", type=int, default=None, help="Tandem KV blocks (default: auto)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--warmup-requests", type=int, default=16)
    ap.add_argument(
        "--sync-too", action="store_true", help="also run Tandem fcfs without async scheduling"
    )
    ap.add_argument(
        "--hf-batch-size", type=int, default=None, help="static generate (default: all)"
    )
    ap.add_argument(
        "--hf-cb-attn", default=HF_CB_ATTN, help="attn_implementation values to try, in order"
    )
    ap.add_argument("--hf-cb-cuda-graph", choices=("on", "off", "auto"), default="on")
    ap.add_argument("--hf-verbose", action="store_true", help="keep transformers' warnings")
    ap.add_argument("--timeout-per-system", type=float, default=900.0, help="seconds; 0: none")
    ap.add_argument("--peak-tflops", type=float, default=None, help="skip the matmul measurement")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="skip the copy measurement")
    ap.add_argument(
        "--out",
        default=None,
        help="write the JSON here instead of bench/results/gpu_serving_<device>.json",
    )
    args = ap.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    args.systems = [s for s in systems if s == "tandem"] if args.skip_transformers else systems
    if not 1 <= args.min_input <= args.max_input or args.output_len < 1 or args.num_requests < 1:
        ap.error("need 1 <= --min-input <= --max-input, --output-len >= 1, --num-requests >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    folder, cfg, tmp = prepare_model(args.model, args.layers)
    try:
        run(args, folder, cfg)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, folder: str, cfg: Any) -> None:
    wl = make_workload(args.workload, args.num_requests, args.seed, args.min_input,
                       args.max_input, args.output_len, cfg.vocab_size)  # fmt: skip
    warm_n = max(1, min(args.warmup_requests, args.num_requests))
    warm_src = make_workload(args.workload, warm_n, args.seed + 1, args.min_input,
                             args.max_input, args.output_len, cfg.vocab_size)  # fmt: skip
    # Short outputs; varied when the workload's are, so hf-cb's warm-up takes the same API path.
    warm_outs = [min(8, args.output_len)] * warm_n
    if len(set(wl.output_lens)) > 1:
        warm_outs = [4 + i % 5 for i in range(warm_n)] if warm_n > 1 else [4]
    warm = Workload(warm_src.prompts, warm_outs)
    device = g.device_name(args.device) if args.device.startswith("cuda") else args.device
    peak, bw = measure_limits(args.device, args.peak_tflops, args.bandwidth_gbs)
    floor = workload_floor(cfg, wl.input_lens, wl.output_lens, peak, bw)
    print(
        f"device {device}: bf16 matmul {peak:.1f} TFLOP/s, copy {bw / 1e9:.0f} GB/s (read + write)"
    )
    print(f"model {args.model} ({cfg.num_layers} layers), workload {json.dumps(wl.describe())}")
    print(f"floor: prefill {floor['prefill_s']:.2f} s + decode {floor['decode_s']:.2f} s "
          f"({floor['decode_iterations']} iterations) = {floor['floor_s']:.2f} s, "
          f"{floor['output_tokens_per_s']:.0f} output tok/s", flush=True)  # fmt: skip
    if not args.hf_verbose:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
        except ImportError:
            pass

    results: dict[str, dict[str, Any]] = {}
    if "tandem" in args.systems:
        for policy in [p for p in args.policies.split(",") if p]:
            name = "tandem" if policy == "fcfs" else f"tandem-{policy}"
            results[name] = guarded(name, args.timeout_per_system,
                                    lambda p=policy: run_tandem(args, folder, p, wl, warm))  # fmt: skip
            free_memory(args.device)
        if args.sync_too:
            results["tandem-sync"] = guarded(
                "tandem-sync", args.timeout_per_system,
                lambda: run_tandem(args, folder, "fcfs", wl, warm, async_scheduling=False),
            )  # fmt: skip
            free_memory(args.device)
    hf_systems = [s for s in ("hf-cb", "hf-static") if s in args.systems]
    if hf_systems:
        holder: dict[str, Any] = {}

        def build() -> dict[str, Any]:
            holder["model"] = build_hf_model(folder, args.device, args.dtype)
            return {}

        built = guarded("transformers model", args.timeout_per_system, build)
        runners = {"hf-cb": run_hf_cb, "hf-static": run_hf_static}
        for name in hf_systems:
            if "error" in built:
                results[name] = {"error": f"model build failed: {built['error']}"}
                continue
            results[name] = guarded(name, args.timeout_per_system,
                                    lambda f=runners[name]: f(args, holder["model"], wl, warm))  # fmt: skip
            free_memory(args.device)
        holder.clear()
        free_memory(args.device)

    tandem_name, tandem_tps = next(
        ((k, r["output_tokens_per_s"]) for k, r in results.items()
         if k.startswith("tandem") and "output_tokens_per_s" in r),
        (None, None),
    )  # fmt: skip
    if args.workload == "uniform":
        lengths = dict(
            min_input=args.min_input, max_input=args.max_input, output_len=args.output_len
        )
    else:
        lengths = dict(clip_input=SHAREGPT_MAX_INPUT, clip_output=SHAREGPT_MAX_OUTPUT)
    payload = dict(
        device=device, model=args.model, layers=cfg.num_layers, dtype=args.dtype, systems=args.systems,
        workload=dict(kind=args.workload, seed=args.seed, **lengths,
                      token_ids=[TOKEN_LOW, TOKEN_HIGH], arrivals="all at once",
                      **wl.describe()),
        floor=floor, target_floor_ratio=TARGET_FLOOR_RATIO,
        tandem_floor_ratio=tandem_tps / floor["output_tokens_per_s"] if tandem_tps else None,
        tandem_floor_ratio_system=tandem_name,
        results=results, versions=versions(), options=vars(args), argv=sys.argv[1:],
    )  # fmt: skip
    payload = json.loads(json.dumps(payload, default=float))  # numpy scalars → plain JSON
    text = json.dumps(payload, indent=2) + "\n"
    paths = []
    if args.device.startswith("cuda") and not args.out:  # --out: instead of the default file
        paths.append(g.write_result("gpu_serving", payload, device=args.device))
    if args.out:
        Path(args.out).write_text(text)
        paths.append(Path(args.out))
    print("\n" + table(results, floor))
    if tandem_tps:
        ratio = payload["tandem_floor_ratio"]
        verdict = "meets" if ratio >= TARGET_FLOOR_RATIO else "misses"
        print(
            f"{tandem_name}: {ratio:.2f} of the floor's throughput ({verdict} the "
            f"{TARGET_FLOOR_RATIO:.2f} target)"
        )
    for p in paths:
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
