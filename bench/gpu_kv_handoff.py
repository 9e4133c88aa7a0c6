"""KV handoff between two GPUs: NCCL's own peak, our nccl backend, and TTFT.

Two processes, as in serving: this one is the prefill side (cuda:0, NCCL rank 0), a
``tests.gpu.nccl_peer`` process the decode side (cuda:1, rank 1).

(a) NCCL peak: plain CuPy ``send``/``recv`` of ``--raw-mib`` MiB buffers on a fresh
    communicator, ``--raw-iters`` times after a warm-up, timed with CUDA events on both ranks
    (GB/s over the shorter of the two times: the stricter peak). Also at each request size.
(b) Handoff through the backend (``NcclKVSender`` -> ``NcclKVReceiver``) with Llama-3-8B KV
    shapes (32 layers, 8 KV heads, head dim 128, bf16, blocks of 16) for requests of 512,
    2k and 8k tokens: gather of scattered blocks from a 2 GiB KV tensor, offer/accept,
    state, NCCL payload, scatter into the receiver's KV tensor (synchronised), DONE.
    GB/s = payload bytes / that whole time; the ratio to (a)'s peak (target >= 0.8).
(c) TTFT of disaggregated (prefill cuda:0, decode cuda:1, nccl) against colocated (cuda:0)
    serving at low load (one request at a time), with ``--model`` (default
    ``random:llama-3-8b``: random weights, no download). Skipped with a message when this
    build does not support that model spec, so (a) and (b) still run.

    python bench/gpu_kv_handoff.py            # about 2-4 minutes on 2 x H200
    python bench/gpu_kv_handoff.py --no-ttft  # (a) and (b) only, under a minute

Prints a table last and writes bench/results/gpu_kv_handoff_<device>.json. Without two
CUDA devices and CuPy it prints "skipped: ..." and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
KV_BLOCKS = 1024  # 2 GiB of bf16 KV on each GPU
SIZES = (512, 2048, 8192)
HASH = "nccl-peer"


def why_skip() -> str | None:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        return f"needs 2 CUDA devices (found {n})"
    try:
        from cupy.cuda import nccl
    except ImportError:
        return "needs cupy (pip install cupy-cuda13x)"
    return None if getattr(nccl, "available", True) else "cupy cannot load NCCL"


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def raw_nccl(peer, nbytes: int, iters: int) -> dict:
    """(a): both ranks run the same plain send/recv loop; GB/s over the shorter time."""
    from kvtransfer.nccl_cupy import CupyComms
    from tests.gpu.nccl_peer import raw_p2p

    uid = CupyComms().unique_id()
    peer.command(cmd="raw", uid=uid.hex(), nbytes=nbytes, iters=iters)
    send_s = raw_p2p(uid, 0, "cuda:0", nbytes, iters)
    recv_s = peer.next(lambda m: "raw_s" in m, timeout=120)["raw_s"]
    best = min(send_s, recv_s)
    return {"bytes": nbytes, "iters": iters, "send_s": send_s, "recv_s": recv_s,
            "gbps": gbps(nbytes * iters, best)}  # fmt: skip


async def handoffs(peer, iters: int) -> list[dict]:
    """(b): every size, ``iters`` timed transfers after two warm-ups (the first one also
    builds the communicator pair, timed separately as ``first_s``)."""
    from kvtransfer import KVBundle, NcclKVSender

    shape = (LAYERS, 2, KV_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM)
    kv = torch.randn(shape, dtype=torch.bfloat16, device="cuda:0")
    sender = NcclKVSender(HASH, device="cuda:0", timeout_s=120.0)
    g = torch.Generator().manual_seed(0)
    rows, n = [], 0
    for tokens in SIZES:
        blocks = tokens // BLOCK
        times, gathers, scatters = [], [], []
        for i in range(iters + 2):
            ids = torch.randperm(KV_BLOCKS, generator=g)[:blocks].to("cuda:0")
            t0 = time.perf_counter()
            payload = kv.index_select(2, ids)  # what KVTensors.gather does
            torch.cuda.current_stream("cuda:0").synchronize()  # as gather_blocks does
            t1 = time.perf_counter()
            await sender.send(peer.address, KVBundle(f"r{n}", tokens, payload, {"i": i}))
            t2 = time.perf_counter()
            msg = peer.next(lambda m, rid=f"r{n}": m.get("committed") == rid)
            n += 1
            if n == 1:
                first_s = t2 - t0
            if i >= 2:
                times.append(t2 - t0)
                gathers.append(t1 - t0)
                scatters.append(msg["scatter_s"] or 0.0)
        nbytes = payload.numel() * payload.element_size()
        med = statistics.median(times)
        rows.append({"tokens": tokens, "bytes": nbytes, "median_s": med, "best_s": min(times),
                     "gather_s": statistics.median(gathers),
                     "scatter_s": statistics.median(scatters),
                     "gbps": gbps(nbytes, med), "best_gbps": gbps(nbytes, min(times))})  # fmt: skip
    rows[0]["first_transfer_s"] = first_s
    await sender.close()
    return rows


def ttft(model: str, prompt_lens: list[int], timeout: float) -> dict:
    """(c): sequential streaming requests against a colocated and a disaggregated server."""
    from tests.e2e.servers import serve

    try:
        from tandem.engine.llm import build_engine_config

        build_engine_config(model=model)  # resolves the model spec as `tandem serve` does
    except Exception as e:  # any reason means: not supported by this build
        return {"skipped": f"model {model!r} is not supported by this build ({e})"}
    common = ["--dtype", "bfloat16", "--kv-blocks", "2048", "--policy", "fcfs",
              "--max-num-batched-tokens", "8192", "--max-model-len", "8192"]  # fmt: skip
    setups = {
        "colocated": ["--device", "cuda:0"],
        "disaggregated": [
            "--prefill-workers",
            "1",
            "--decode-workers",
            "1",
            "--prefill-device",
            "cuda:0",
            "--decode-device",
            "cuda:1",
            "--kv-transfer",
            "nccl",
        ],  # fmt: skip
    }
    out: dict = {"model": model}
    for name, extra in setups.items():
        try:
            with serve(model, *extra, *common, timeout=timeout) as url:
                out[name] = {str(n): _ttft_ms(url, n) for n in prompt_lens}
        except AssertionError as e:  # the server did not come up
            return {"skipped": f"tandem serve --model {model} ({name}) did not start: {e}"}
    for n in map(str, prompt_lens):
        out.setdefault("ratio", {})[n] = {
            k: out["disaggregated"][n][k] / out["colocated"][n][k] for k in ("ttft_ms", "ttst_ms")
        }
    return out


def _ttft_ms(url: str, prompt_len: int, reps: int = 5) -> dict:
    """Median time to the first and to the second streamed token (the second one comes
    from the decode worker, after the handoff, when disaggregated)."""
    firsts, seconds = [], []
    for rep in range(reps + 1):
        ids = [(rep * 7919 + i * 31) % 1000 + 10 for i in range(prompt_len)]
        body = {"prompt": ids, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                "stream": True}  # fmt: skip
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        t0, stamps = time.perf_counter(), []
        with urllib.request.urlopen(req, timeout=300) as r:
            for line in r:
                if line.startswith(b"data: {") and b'"text"' in line:
                    stamps.append(time.perf_counter() - t0)
        if rep and len(stamps) >= 2:  # rep 0 warms up
            firsts.append(stamps[0] * 1000)
            seconds.append(stamps[1] * 1000)
    return {"ttft_ms": statistics.median(firsts), "ttst_ms": statistics.median(seconds)}


def table(results: dict) -> str:
    peak = results["nccl_peak"]["gbps"]
    lines = [f"NCCL send/recv peak cuda:0 -> cuda:1 ({results['nccl_peak']['bytes'] >> 20} MiB): "
             f"{peak:.1f} GB/s", "",
             f"{'tokens':>7} {'MiB':>6} {'handoff ms':>10} {'GB/s':>7} {'/peak':>6} "
             f"{'gather ms':>9} {'scatter ms':>10} {'raw NCCL GB/s':>13}"]  # fmt: skip
    for row in results["handoff"]:
        lines.append(
            f"{row['tokens']:>7} {row['bytes'] / 2**20:>6.0f} {row['median_s'] * 1e3:>10.2f} "
            f"{row['gbps']:>7.1f} {row['ratio_to_peak']:>6.2f} {row['gather_s'] * 1e3:>9.2f} "
            f"{row['scatter_s'] * 1e3:>10.2f} {row['raw_same_size_gbps']:>13.1f}"
        )
    t = results["ttft"]
    lines.append("")
    if "skipped" in t:
        lines.append(f"TTFT: skipped: {t['skipped']}")
    else:
        lines.append(f"TTFT at low load, {t['model']} (median ms; ttst = second token):")
        for n, r in t["ratio"].items():
            c, d = t["colocated"][n], t["disaggregated"][n]
            lines.append(
                f"  {n:>5} tokens: colocated ttft {c['ttft_ms']:.1f} ttst {c['ttst_ms']:.1f} | "
                f"disaggregated ttft {d['ttft_ms']:.1f} ttst {d['ttst_ms']:.1f} "
                f"(x{r['ttft_ms']:.2f}, x{r['ttst_ms']:.2f})"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:llama-3-8b", help="model for the TTFT part")
    p.add_argument("--no-ttft", action="store_true", help="skip (c)")
    p.add_argument("--iters", type=int, default=5, help="timed handoffs per size")
    p.add_argument("--raw-mib", type=int, default=256)
    p.add_argument("--raw-iters", type=int, default=20)
    p.add_argument("--prompt-lens", default="512,2048")
    p.add_argument("--server-timeout", type=float, default=240.0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    reason = why_skip()
    if reason:
        print(f"skipped: {reason}")
        return 0
    from tests.gpu.nccl_peer import peer

    name = torch.cuda.get_device_name(0)
    results: dict = {"device": name, "devices": [name, torch.cuda.get_device_name(1)],
                     "kv_shape": {"layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                                  "block_size": BLOCK, "dtype": "bfloat16"}}  # fmt: skip
    t_start = time.perf_counter()
    kv_args = ["--kv-blocks", str(KV_BLOCKS), "--layers", str(LAYERS), "--block-size", str(BLOCK),
               "--kv-heads", str(KV_HEADS), "--head-dim", str(HEAD_DIM)]  # fmt: skip
    with peer(*kv_args) as far:
        results["nccl_peak"] = raw_nccl(far, args.raw_mib * 2**20, args.raw_iters)
        results["handoff"] = asyncio.run(handoffs(far, args.iters))
        for row in results["handoff"]:
            same = raw_nccl(far, row["bytes"], max(3, args.raw_iters // 4))
            row["raw_same_size_gbps"] = same["gbps"]
            row["ratio_to_peak"] = row["gbps"] / results["nccl_peak"]["gbps"]
            row["ratio_to_raw_same_size"] = row["gbps"] / same["gbps"]
    lens = [int(x) for x in args.prompt_lens.split(",")]
    results["ttft"] = (
        {"skipped": "--no-ttft"} if args.no_ttft else ttft(args.model, lens, args.server_timeout)
    )
    results["wall_s"] = time.perf_counter() - t_start
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    out = Path(args.out) / f"gpu_kv_handoff_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwrote {out} ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
