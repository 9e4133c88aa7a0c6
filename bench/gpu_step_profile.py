"""Where a serving run's time goes, step by step (issue 13's open question).

Runs ``bench/gpu_serving.py``'s in-process Tandem engine on its workload (default
``sharegpt-like``, 1,000 requests, all at once) and records every iteration the engine
launches: its composition (decode rows, prefill chunks and tokens), whether it ran as a
CUDA graph or eagerly, the host time of ``ModelRunner.launch`` (input preparation and
kernel launches), the device time between CUDA events recorded around it, and the wall
time to the next launch. Prints one row per step class (graph decode / eager with
prefill / eager decode) and the totals: GPU busy time against the makespan, so that
what stands between the run and the floor is measured, not guessed.

The device time of a step is from the event the host records just before launching it to
the event after its last kernel: with async scheduling the stream is still busy with the
previous step when the first event is recorded, so the measure starts when the stream
reaches it, which is when this step's kernels can start. Swap and cache copies of the step
are included.

GPU:
    PYTHONPATH=. python bench/gpu_step_profile.py      # bench/results/gpu_step_profile_h200.json
CPU smoke (tiny shapes):
    PYTHONPATH=. python bench/gpu_step_profile.py --device cpu --dtype float32 \\
        --model llama-3-debug --num-requests 8 --out /tmp/steps.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gpu_serving as gs  # noqa: E402


def classify(sched: Any, graphed: bool) -> str:
    """``graph decode``, ``eager + prefill`` (any chunk of more than one token, or the last
    chunk of a prompt) or ``eager decode``."""
    if graphed:
        return "graph decode"
    prefill = any(c.num_tokens > 1 or c.start_pos < c.request.num_prompt_tokens
                  for c in sched.chunks)  # fmt: skip
    return "eager + prefill" if prefill else "eager decode"


class StepRecorder:
    """Wraps an engine's ``runner.launch`` (an instance attribute shadows the method, so
    ``execute`` and the async path both go through it)."""

    def __init__(self, engine: Any, cuda: bool) -> None:
        import torch

        self.torch, self.cuda, self.engine = torch, cuda, engine
        self.rows: list[dict[str, Any]] = []
        self.events: list[tuple[Any, Any]] = []
        self.recording = False
        runner = engine.runner
        launch = runner.launch

        def timed_launch(sched: Any) -> Any:
            if not self.recording or not sched.chunks:
                return launch(sched)
            graphed = runner.graphs is not None and runner.graphs.can_run(sched)
            start = end = None
            if cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
            t0 = time.perf_counter()
            step = launch(sched)
            host = time.perf_counter() - t0
            if cuda:
                end.record()
                self.events.append((start, end))
            prefill_tokens = sum(c.num_tokens for c in sched.chunks if c.num_tokens > 1)
            self.rows.append(
                dict(
                    t=t0, host_s=host, kind=classify(sched, graphed),
                    rows=len(sched.chunks), prefill_tokens=prefill_tokens,
                    decode_rows=sum(1 for c in sched.chunks if c.num_tokens == 1),
                    swaps=bool(sched.swaps_out or sched.swaps_in),
                )  # fmt: skip
            )
            return step

        runner.launch = timed_launch

    def finish(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            for row, (start, end) in zip(self.rows, self.events, strict=True):
                row["gpu_s"] = start.elapsed_time(end) / 1e3
        for a, b in zip(self.rows, self.rows[1:], strict=False):
            a["wall_s"] = b["t"] - a["t"]


def summarize_steps(rows: list[dict[str, Any]], makespan: float) -> dict[str, Any]:
    """Per step class: steps, mean wall / host / GPU ms, rows, prefill tokens; totals."""
    classes: dict[str, dict[str, Any]] = {}
    for kind in sorted({r["kind"] for r in rows}):
        rs = [r for r in rows if r["kind"] == kind]
        walls = [r["wall_s"] for r in rs if "wall_s" in r]
        gpus = [r["gpu_s"] for r in rs if "gpu_s" in r]
        classes[kind] = dict(
            steps=len(rs),
            wall_ms_mean=1e3 * sum(walls) / len(walls) if walls else None,
            wall_s_total=sum(walls),
            host_launch_ms_mean=1e3 * sum(r["host_s"] for r in rs) / len(rs),
            gpu_ms_mean=1e3 * sum(gpus) / len(gpus) if gpus else None,
            gpu_s_total=sum(gpus) if gpus else None,
            rows_mean=sum(r["rows"] for r in rs) / len(rs),
            decode_rows_mean=sum(r["decode_rows"] for r in rs) / len(rs),
            prefill_tokens_mean=sum(r["prefill_tokens"] for r in rs) / len(rs),
        )  # fmt: skip
    gpu_total = sum(r.get("gpu_s", 0.0) for r in rows)
    return dict(
        classes=classes, steps=len(rows), makespan_s=makespan,
        gpu_busy_s=gpu_total if any("gpu_s" in r for r in rows) else None,
        gpu_busy_share=gpu_total / makespan if makespan and gpu_total else None,
        host_launch_s=sum(r["host_s"] for r in rows),
    )  # fmt: skip


def table(summary: dict[str, Any]) -> str:
    def f(x: float | None, d: int = 2) -> str:
        return "" if x is None else f"{x:,.{d}f}"

    lines = [
        "| step class | steps | wall ms | GPU ms | host launch ms | rows | decode rows "
        "| prefill tokens | wall s total | GPU s total |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, c in summary["classes"].items():
        lines.append(
            f"| {kind} | {c['steps']} | {f(c['wall_ms_mean'])} | {f(c['gpu_ms_mean'])} "
            f"| {f(c['host_launch_ms_mean'])} | {c['rows_mean']:.0f} | {c['decode_rows_mean']:.0f} "
            f"| {c['prefill_tokens_mean']:.0f} | {f(c['wall_s_total'])} | {f(c['gpu_s_total'])} |"
        )
    lines.append(
        f"\nmakespan {summary['makespan_s']:.2f} s, {summary['steps']} steps; GPU busy "
        f"{f(summary['gpu_busy_s'])} s ({f(summary['gpu_busy_share'])} of the makespan); "
        f"host time in launch {summary['host_launch_s']:.2f} s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3-8b", help="a tandem/model_configs name")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--workload", choices=("uniform", "sharegpt-like"), default="sharegpt-like")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--min-input", type=int, default=64)
    ap.add_argument("--max-input", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--kv-blocks", type=int, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--policy", default="mlfq")
    ap.add_argument("--no-async-scheduling", action="store_true")
    ap.add_argument("--out", default=None, help="JSON (default: bench/results/)")
    args = ap.parse_args(argv)

    from tandem.engine.llm import build_engine_config
    from tandem.engine.llm_engine import LLMEngine

    folder, cfg, _ = gs.prepare_model(args.model, args.layers)
    wl = gs.make_workload(args.workload, args.num_requests, args.seed, args.min_input,
                          args.max_input, args.output_len, cfg.vocab_size)  # fmt: skip
    warm_src = gs.make_workload(args.workload, 16, args.seed + 1, args.min_input,
                                args.max_input, args.output_len, cfg.vocab_size)  # fmt: skip
    warm = gs.Workload(warm_src.prompts, [4 + i % 5 for i in range(16)])
    config = build_engine_config(
        model=folder, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, policy=args.policy,
        kv_blocks=args.kv_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
        async_scheduling=False if args.no_async_scheduling else None,
    )  # fmt: skip
    engine = LLMEngine(config)
    cuda = args.device.startswith("cuda")
    rec = StepRecorder(engine, cuda)
    gs.drive_engine(engine, warm)
    gs.sync(args.device)
    rec.recording = True
    result = gs.drive_engine(engine, wl)
    rec.recording = False
    rec.finish()
    summary = summarize_steps(rec.rows, result["makespan_s"])
    device = gs.g.device_name(args.device) if cuda else args.device
    out = dict(
        device=device, model=args.model, workload=args.workload,
        num_requests=args.num_requests, async_scheduling=engine.async_scheduling,
        cuda_graphs=engine.runner.graphs is not None, serving=result, steps=summary,
        versions=gs.versions(), args=vars(args),
    )  # fmt: skip
    print(f"{device}: {args.model} {args.dtype}, {args.workload} x {args.num_requests}, "
          f"async {engine.async_scheduling}, output {result['output_tokens_per_s']:.0f} tok/s")  # fmt: skip
    print(table(summary))
    name = "gpu_step_profile_" + (device.split()[-1].lower() if cuda else "cpu") + ".json"
    path = Path(args.out or ROOT / "bench" / "results" / name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
