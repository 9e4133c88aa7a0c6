"""The ``tandem`` command.

Subcommands:
  make-tiny-model DIR   write the small bundled test model (random weights, local tokenizer)
  profile-cost-model F  profile the iteration cost model on this machine, write it to F
  generate PROMPT ...   offline generation with the engine (default: the bundled model, CPU)
  serve                 the whole stack on this machine: router (HTTP) + supervised workers
  router                the HTTP front end alone (--worker HOST:PORT ...)
  decode-worker         one worker process (--colocated: it also runs prefill)
  prefill-worker        one prefill worker process (hands KV to decode workers)

Every --help shows each flag's default. Services print a start-up summary once they serve.

Errors in arguments exit with status 2 and a message naming the flag; no tracebacks.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from tandem.supervisor import Backoff


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default (as ``ArgumentDefaultsHelpFormatter`` does),
    except where the help already says what the default is and for switches (store_true)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _add_engine_args(p: argparse.ArgumentParser, profiling: bool = False) -> None:
    """The engine flags. ``profiling`` (``profile-cost-model``): only those that change the
    measured times; the others keep their defaults without being flags there."""

    def serving(*flags: str, **kw) -> None:  # a flag that does not change a profile
        if not profiling:
            p.add_argument(*flags, **kw)
            return
        dest = kw.get("dest") or flags[0].lstrip("-").replace("-", "_")
        p.set_defaults(**{dest: kw.get("default", False if kw.get("action") else None)})

    p.add_argument(
        "--model",
        default=None,
        help="Hugging Face model folder, or random:NAME for a well-known architecture with "
        "random weights (e.g. random:llama-3-8b; benchmarks) (default: the bundled tiny model)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="weights"
    )
    serving("--seed", type=int, default=0, help="seed for unseeded sampling (default: 0)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    p.add_argument(
        "--kv-blocks", type=int, default=None, help="device KV blocks (default: from memory)"
    )
    serving(
        "--host-kv-blocks", type=int, default=0, help="host-tier KV blocks for swap (default: 0)"
    )
    serving(
        "--host-kv-gib",
        type=float,
        default=None,
        help="size the host KV tier in GiB instead of --host-kv-blocks (default: not set)",
    )
    serving(
        "--swap-watermark",
        type=float,
        default=0.05,
        help="with a host tier: keep this fraction of device KV blocks free by offloading "
        "idle low-priority requests; 0 = swap only as preemption (default: 0.05)",
    )
    serving(
        "--swap-int8",
        action="store_true",
        help="store swapped KV blocks as int8 with per-head absmax scales (lossy)",
    )
    if profiling:  # a profile does not depend on caching
        p.set_defaults(prefix_caching=True)
    else:
        caching = p.add_mutually_exclusive_group()
        caching.add_argument(
            "--enable-prefix-caching",
            dest="prefix_caching",
            action="store_true",
            default=True,
            help="reuse the KV of cached full blocks across requests that share a prefix (default)",
        )
        caching.add_argument(
            "--no-prefix-caching",
            dest="prefix_caching",
            action="store_false",
            help="compute every prompt from scratch",
        )
    p.add_argument("--max-num-seqs", type=int, default=256, help="max requests per iteration")
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=2048, help="token budget per iteration"
    )
    serving("--no-chunked-prefill", action="store_true", help="prefill whole prompts only")
    serving(
        "--policy",
        default="mlfq",
        choices=["fcfs", "mlfq", "alise"],
        help="scheduling policy (default: mlfq)",
    )
    serving(
        "--max-model-len",
        type=int,
        default=None,
        help="max prompt + output tokens (default: the model's max_position_embeddings)",
    )
    serving("--cost-model", default=None, help="cost model JSON (default: profile at start-up)")
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="on CUDA without --kv-blocks: fraction of GPU memory for weights + KV (default: 0.9)",
    )
    p.add_argument(
        "--attention-backend",
        default="auto",
        choices=["auto", "torch", "triton"],
        help="attention kernels: auto = triton on CUDA, torch reference on CPU (default: auto)",
    )
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode batches")
    serving(
        "--no-async-scheduling",
        action="store_true",
        help="schedule each iteration only after the previous one finished (default on CUDA: "
        "the next iteration is scheduled while the current one runs)",
    )


def _add_http_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument(
        "--served-model-name", default=None, help="model name in the API (default: folder name)"
    )
    p.add_argument("--max-in-flight", type=int, default=4096, help="requests in flight before 429")
    p.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds before a request fails (504)"
    )
    p.add_argument(
        "--max-body-mb", type=float, default=16.0, help="largest request body in MiB (413 past it)"
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=15.0,
        help="seconds a connection has to send a whole request head (slow clients are closed)",
    )
    p.add_argument(
        "--body-timeout", type=float, default=30.0, help="seconds to receive a request body (408)"
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="longest prompt in tokens (400 past it) (default: the model's context)",
    )
    p.add_argument(
        "--max-tokens-limit",
        type=int,
        default=None,
        help="largest max_tokens a request may ask for (400 past it) (default: what fits the "
        "context)",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /v1/*, /generate and the other API "
        "routes (repeatable; also TANDEM_API_KEY, comma-separated; prefer the environment: "
        "flags show in ps) (default: open)",
    )
    p.add_argument(
        "--admin-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /admin/* (also TANDEM_ADMIN_KEY) "
        "(default: /admin/* only when listening on loopback only)",
    )
    p.add_argument(
        "--metrics-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on /metrics (also TANDEM_METRICS_KEY) "
        "(default: open)",
    )
    p.add_argument(
        "--max-concurrent-per-key",
        type=int,
        default=None,
        help="requests in flight per API key before 429 (needs --api-key) (default: no limit)",
    )
    p.add_argument(
        "--access-log",
        nargs="?",
        const="-",
        default=None,
        metavar="FILE",
        help="log one line per HTTP request: to stdout, or appended to FILE (default: off)",
    )


def _add_migration_args(p: argparse.ArgumentParser) -> None:
    """The router's live-migration flags (``router.migration.MigrationConfig``)."""
    p.add_argument(
        "--migration",
        default="off",
        choices=["off", "manual", "balanced"],
        help="live migration between decode workers: off; manual (admin endpoints only: "
        "/admin/migrate, /admin/drain/WORKER); balanced (also a rebalancer that moves "
        "requests from the most to the least loaded worker) (default: off)",
    )
    p.add_argument(
        "--migration-interval",
        type=float,
        default=0.5,
        help="seconds between two rebalancer decisions (default: 0.5)",
    )
    p.add_argument(
        "--migration-min-gap",
        type=float,
        default=0.1,
        help="rebalance only when the virtual usage (KV demand over capacity) of the most "
        "and least loaded decode workers differs by at least this (default: 0.1)",
    )
    p.add_argument(
        "--migration-final-blocks",
        type=int,
        default=2,
        help="stop-and-copy once at most this many KV blocks are left to send (default: 2)",
    )
    p.add_argument(
        "--migration-max-stages",
        type=int,
        default=8,
        help="stages per migration at most, the final stop-and-copy included (default: 8)",
    )
    p.add_argument(
        "--dispatch",
        default="prefix",
        choices=["prefix", "usage", "round-robin"],
        help="how new requests pick a decode worker: lowest virtual usage less a bonus for "
        "the prompt prefix it has cached (prefix), lowest virtual usage (usage), or in "
        "turn (a known spread for benchmarks) (default: prefix)",
    )


def _add_cluster_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cluster-secret-file",
        default=None,
        metavar="FILE",
        help="shared secret (at least 16 bytes) that router and workers prove to each other "
        "on every control connection (tandem.auth); also TANDEM_CLUSTER_SECRET (default: none)",
    )


def _cluster_secret(args: argparse.Namespace, parser: argparse.ArgumentParser) -> bytes | None:
    from tandem.auth import load_secret

    try:
        return load_secret(args.cluster_secret_file)
    except ValueError as e:
        parser.error(str(e))


def _add_worker_args(p: argparse.ArgumentParser) -> None:
    _add_cluster_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="control-plane host to listen on")
    p.add_argument(
        "--port", type=int, default=0, help="control port (default: a free one, printed)"
    )
    p.add_argument(
        "--registry",
        default=None,
        help="registry URL (redis://host:port) to register in (default: none; give the "
        "router --worker HOST:PORT)",
    )
    p.add_argument("--worker-id", default=None, help="id in the registry (default: random)")
    p.add_argument("--advertise-host", default=None, help="host the router dials (default: --host)")
    p.add_argument(
        "--registry-ttl", type=float, default=5.0, help="seconds a silent worker stays registered"
    )
    p.add_argument(
        "--ready-fd",
        type=int,
        default=None,
        metavar="FD",
        help="once listening, write 'TANDEM_WORKER_READY HOST:PORT' to this open file "
        "descriptor and close it: a handshake for supervisors such as `tandem serve` "
        "(1 = stdout) (default: none)",
    )
    p.add_argument(
        "--quiet", action="store_true", help="no start-up summary (its supervisor prints one)"
    )
    p.add_argument(
        "--fake-engine",
        action="store_true",
        help="no model: emit tokens to measure the control plane",
    )
    p.add_argument(
        "--fake-step-ms", type=float, default=0.0, help="with --fake-engine: ms per iteration"
    )


def _add_migration_lease_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--migration-lease",
        type=float,
        default=10.0,
        help="seconds a decode worker keeps the blocks of an incoming migration whose "
        "source went silent between stages (default: 10)",
    )


_ENGINE_FLAGS = (
    "model", "device", "dtype", "seed", "block_size", "kv_blocks", "host_kv_blocks", "host_kv_gib",
    "swap_watermark", "max_num_seqs", "max_num_batched_tokens", "policy", "max_model_len",
    "cost_model", "gpu_memory_utilization", "attention_backend",
)  # fmt: skip


_SERVICES = ("serve", "router", "decode-worker", "prefill-worker")  # long-running: they log


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem",
        description="Tandem LLM serving",
        epilog="`tandem COMMAND --help` lists a command's flags and their defaults.",
        formatter_class=HelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str | None = None, **kw):
        """A subcommand: its line in `tandem --help`, a description atop its own --help."""
        description = description or help[0].upper() + help[1:] + "."
        return subparsers.add_parser(
            name, help=help, description=description, formatter_class=HelpFormatter, **kw
        )

    p = command("make-tiny-model", help="write the small bundled test model")
    p.add_argument("dir", help="output folder")
    p.add_argument(
        "--arch", default="llama", help="llama | mistral | qwen2 | qwen3 (default: llama)"
    )
    p.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")

    p = command(
        "profile-cost-model", help="profile prefill/decode times on this machine, write JSON"
    )
    p.add_argument("out", help="output JSON file (use with --cost-model)")
    _add_engine_args(p, profiling=True)

    p = command(
        "serve",
        help="the whole stack on this machine: the OpenAI API (router) and its worker "
        "processes, supervised",
        description="Serve the OpenAI API on this machine: the router in this process and "
        "worker processes behind it (one colocated worker, or --prefill-workers N "
        "--decode-workers M), restarted with backoff when one dies. With no flags: the "
        "bundled tiny model on the CPU at http://127.0.0.1:8000.",
    )
    _add_engine_args(p)
    _add_http_args(p)
    _add_cluster_arg(p)
    backoff = Backoff()
    p.add_argument(
        "--no-restart-workers",
        action="store_true",
        help="leave a dead worker dead (serve stops once a role has no worker left); by "
        f"default it is restarted after {backoff.delay(1):g} s, {backoff.delay(2):g} s, "
        f"{backoff.delay(3):g} s ... at most {backoff.max_s:g} s",
    )
    p.add_argument(
        "--worker-port", type=int, default=0, help="worker control port (default: a free one)"
    )
    p.add_argument(
        "--prefill-workers", type=int, default=0, help="disaggregated: prefill worker processes"
    )
    p.add_argument(
        "--decode-workers", type=int, default=0, help="disaggregated: decode worker processes"
    )
    p.add_argument(
        "--prefill-device",
        default=None,
        help="disaggregated: device(s) of the prefill workers, e.g. cuda:0 or cuda:0,cuda:1 "
        "(dealt round-robin; default: --device)",
    )
    p.add_argument(
        "--decode-device",
        default=None,
        help="disaggregated: device(s) of the decode workers, e.g. cuda:1 (default: --device)",
    )
    p.add_argument(
        "--kv-transfer",
        default="auto",
        choices=["auto", "tcp", "nccl"],
        help="disaggregated: how KV moves from prefill to decode workers; auto = nccl when "
        "every worker is on a GPU and no GPU has both kinds, else tcp (default: auto)",
    )
    _add_migration_args(p)
    _add_migration_lease_arg(p)

    p = command("router", help="the HTTP front end (no torch)")
    p.add_argument(
        "--model",
        default=None,
        help="model folder (tokenizer, chat template) (default: the bundled tiny model)",
    )
    p.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a worker to use (repeatable) (default: none; see --registry)",
    )
    p.add_argument(
        "--registry",
        default=None,
        help="registry URL (redis://host:port): find workers there (default: none)",
    )
    p.add_argument(
        "--cost-model",
        default=None,
        help="cost model JSON for skip-join admission (default: a generic one)",
    )
    _add_http_args(p)
    _add_cluster_arg(p)
    _add_migration_args(p)

    for name, help_text in (
        ("decode-worker", "a decode worker (receives KV from prefill workers), or --colocated"),
        ("prefill-worker", "a prefill worker: chunked prefill, then KV handoff to a decode worker"),
    ):
        p = command(name, help=help_text)
        _add_engine_args(p)
        _add_worker_args(p)
        if name == "decode-worker":
            p.add_argument(
                "--colocated", action="store_true", help="also run prefill: no KV handoff"
            )
            p.add_argument(
                "--kv-port", type=int, default=0, help="KV receiver port (default: a free one)"
            )
            p.add_argument(
                "--kv-lease",
                type=float,
                default=30.0,
                help="seconds a KV reservation waits for its bytes",
            )
            _add_migration_lease_arg(p)
        p.add_argument(
            "--kv-timeout",
            type=float,
            default=30.0,
            help="seconds a KV transfer (handoff, migration stage) may take",
        )
        p.add_argument(
            "--kv-transfer",
            default="tcp",
            choices=["tcp", "nccl"],
            help="KV transfer backend (handoff, migration), the same on every worker; nccl "
            "needs --device cuda[:N] and CuPy (default: tcp)",
        )

    command(
        "loadgen",
        help="load an OpenAI-compatible server and report latency (see `tandem loadgen -h`)",
        add_help=False,
    )
    p = command("generate", help="offline generation (no server)")
    p.add_argument("prompts", nargs="+", help="prompt strings; all run together in one batch")
    _add_engine_args(p)
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k best (default: all)")
    p.add_argument("--ignore-eos", action="store_true", help="go on past end-of-sequence tokens")
    return parser


def _make_tiny_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from tandem.tinymodel import ARCHS, make_tiny_model

    if args.arch not in ARCHS:
        parser.error(f"--arch must be one of {', '.join(ARCHS)}; got {args.arch!r}")
    path = make_tiny_model(args.dir, arch=args.arch, seed=args.seed)
    print(f"wrote {args.arch} tiny model (seed {args.seed}) to {path}")
    return 0


def _build_llm(args: argparse.Namespace, parser: argparse.ArgumentParser, **overrides):
    """The offline engine from the CLI's engine flags (``overrides`` replace flags)."""
    from dataclasses import replace

    from tandem.engine.llm import LLM

    config = _engine_config(args, parser)
    if overrides:
        sched = {k: v for k, v in overrides.items() if k == "policy"}
        top = {
            ("cost_model_path" if k == "cost_model" else k): v
            for k, v in overrides.items()
            if k != "policy"
        }
        config = replace(config, scheduler=replace(config.scheduler, **sched), **top)
    try:
        return LLM.from_config(config)
    except (ValueError, OSError) as e:
        parser.error(str(e))


def _profile_cost_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from tandem.runner.profile import profile_cost_model

    llm = _build_llm(args, parser, policy="fcfs", cost_model=None)
    sched = llm.config.scheduler
    cost = profile_cost_model(llm.engine.runner, sched.max_num_batched_tokens, sched.max_num_seqs)
    cost.save(args.out)
    print(f"wrote {args.out}: {cost}")
    return 0


def _engine_config(
    args: argparse.Namespace, parser: argparse.ArgumentParser, size_gpu_kv: bool = True
):
    """The engine config from the flags. ``size_gpu_kv=False`` (a parent that only
    validates and spawns workers): no CUDA probe; each worker sizes its own KV tier."""
    from tandem.engine.llm import build_engine_config

    kv_blocks = args.kv_blocks
    if kv_blocks is None and not size_gpu_kv and args.device.startswith("cuda"):
        kv_blocks = 16  # placeholder, never used: the workers get --kv-blocks only if given
    try:
        return build_engine_config(
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            seed=args.seed,
            block_size=args.block_size,
            kv_blocks=kv_blocks,
            host_kv_blocks=args.host_kv_blocks,
            host_kv_gib=args.host_kv_gib,
            swap_watermark=args.swap_watermark,
            swap_int8=args.swap_int8,
            enable_prefix_caching=args.prefix_caching,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_chunked_prefill=not args.no_chunked_prefill,
            policy=args.policy,
            max_model_len=args.max_model_len,
            cost_model=args.cost_model,
            gpu_memory_utilization=args.gpu_memory_utilization,
            attention=args.attention_backend,
            cuda_graphs=not args.enforce_eager,
            async_scheduling=False if args.no_async_scheduling else None,
        )
    except (ValueError, OSError) as e:
        parser.error(str(e))


def _decode_worker(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import asyncio
    import os

    from decode_worker.service import WorkerService

    if args.ready_fd is not None:
        try:
            os.fstat(args.ready_fd)
        except OSError:
            parser.error(f"--ready-fd {args.ready_fd} is not an open file descriptor")
    config = None
    if args.fake_engine:  # no model, no torch: measures the control plane alone
        from tandem.engine.fake import FakeEngine, fake_engine_config

        try:
            engine = FakeEngine(fake_engine_config(args), step_time_s=args.fake_step_ms / 1000)
        except (ValueError, OSError) as e:
            parser.error(str(e))
    else:
        from tandem.engine.llm_engine import LLMEngine

        config = _engine_config(args, parser)
        if args.command == "prefill-worker":
            from dataclasses import replace

            # It hands each request off right after its first token: overlapping would
            # only schedule a decode step there that the handoff then has to wait for.
            config = replace(config, async_scheduling=False)
        if args.kv_transfer == "nccl" and not config.device.startswith("cuda"):
            parser.error(f"--kv-transfer nccl needs --device cuda[:N], got {config.device!r}")
        _select_cuda_device(config.device)
        try:
            engine = LLMEngine(config)
        except (ValueError, OSError) as e:
            parser.error(str(e))

    from tandem.registry import make_registry

    try:
        registry = make_registry(args.registry) if args.registry else None
    except ValueError as e:
        parser.error(f"--registry: {e}")

    common = dict(
        host=args.host,
        port=args.port,
        registry=registry,
        worker_id=args.worker_id,
        advertise_host=args.advertise_host,
        ttl=args.registry_ttl,
        cluster_secret=_cluster_secret(args, parser),
    )
    prefill = args.command == "prefill-worker"
    colocated = not prefill and (args.colocated or args.fake_engine)
    if args.fake_engine and prefill:
        parser.error("--fake-engine runs colocated only (it has no KV to hand off)")
    kv_options = {"device": config.device} if config and args.kv_transfer == "nccl" else {}
    if not args.kv_timeout > 0:
        parser.error(f"--kv-timeout must be > 0, got {args.kv_timeout}")
    if not prefill and not args.migration_lease > 0:
        parser.error(f"--migration-lease must be > 0, got {args.migration_lease}")

    async def run() -> None:
        if prefill:
            from kvtransfer import make_sender
            from prefill_worker.service import PrefillWorkerService

            try:
                sender = make_sender(
                    args.kv_transfer, engine.compat_hash, timeout_s=args.kv_timeout, **kv_options
                )
            except RuntimeError as e:  # nccl without CuPy
                parser.error(f"--kv-transfer {args.kv_transfer}: {e}")
            service = PrefillWorkerService(engine, kv_sender=sender, **common)
        elif colocated:
            service = WorkerService(engine, role="colocated", **common)
        else:
            from decode_worker.disagg import DecodeWorkerService
            from kvtransfer import make_receiver, make_sender

            def receiver(callbacks):
                try:
                    return make_receiver(
                        args.kv_transfer,
                        engine.compat_hash,
                        callbacks,
                        host=args.host,
                        port=args.kv_port,
                        lease_s=args.kv_lease,
                        **kv_options,
                    )
                except RuntimeError as e:  # nccl without CuPy
                    parser.error(f"--kv-transfer {args.kv_transfer}: {e}")

            service = DecodeWorkerService(
                engine,
                kv_receiver_factory=receiver,
                # Migrations out use the same backend as the handoffs in (nccl on GPUs).
                kv_sender=make_sender(
                    args.kv_transfer, engine.compat_hash, timeout_s=args.kv_timeout, **kv_options
                ),
                migration_lease_s=args.migration_lease,
                **common,
            )

        def ready(port: int) -> None:
            address = f"{args.host}:{port}"
            if not args.quiet:
                from tandem.summary import worker_summary

                hello = service.hello()
                print(
                    worker_summary(args.command, address, hello, args.registry, args.registry_ttl),
                    flush=True,
                )
            if args.ready_fd is not None:  # the handshake comes after the summary
                sys.stdout.flush()
                os.write(args.ready_fd, f"TANDEM_WORKER_READY {address}\n".encode())
                if args.ready_fd > 2:
                    os.close(args.ready_fd)

        await service.run(on_ready=ready)  # until SIGTERM/SIGINT; then it deregisters

    _install_uvloop()
    try:
        asyncio.run(run())
    except OSError as e:  # e.g. the port is taken
        print(f"error: {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


def _select_cuda_device(device: str) -> None:
    """Make ``device`` this process's current CUDA device before anything touches CUDA (so
    the caching allocator, NCCL and CuPy all start on it, not on GPU 0). ``device`` comes
    from the engine config, which ``check_device`` has already validated."""
    if not device.startswith("cuda"):
        return
    import torch

    torch.cuda.set_device(torch.device(device).index or 0)


def _router(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.worker and not args.registry:
        parser.error("give --worker HOST:PORT (repeatable) or --registry URL")
    model = args.model
    if model is None:
        from tandem.tinymodel import default_model_dir

        model = str(default_model_dir())
    from tandem.random_model import resolve_model

    try:
        model = resolve_model(model)
    except ValueError as e:
        parser.error(f"--model: {e}")
    from tandem import serve

    serve.run_router(model, args.worker, args, parser, serve.describe_router(args, model))
    return 0


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Router in this process, workers as child processes on loopback: one colocated worker,
    or ``--prefill-workers N --decode-workers M`` for the disaggregated pools."""
    # Validates flags and resolves the default (or random:NAME) model folder.
    config = _engine_config(args, parser, size_gpu_kv=False)
    if (args.prefill_workers > 0) != (args.decode_workers > 0):
        parser.error("--prefill-workers and --decode-workers go together (both >= 1)")
    if args.prefill_workers < 0 or args.decode_workers < 0:
        parser.error("--prefill-workers and --decode-workers must be >= 0")
    from tandem.placement import plan

    try:
        placement = plan(
            args.device,
            args.prefill_workers,
            args.decode_workers,
            args.prefill_device,
            args.decode_device,
            args.kv_transfer,
        )
        from tandem.engine.llm import check_device

        for device in {*placement.prefill, *placement.decode}:
            check_device(device)
    except ValueError as e:
        parser.error(str(e))
    if not args.migration_lease > 0:
        parser.error(f"--migration-lease must be > 0, got {args.migration_lease}")

    engine_flags: list[str] = []
    for name in _ENGINE_FLAGS:
        value = config.model if name == "model" else getattr(args, name)
        if value is not None:
            engine_flags += ["--" + name.replace("_", "-"), str(value)]
    if args.no_chunked_prefill:
        engine_flags.append("--no-chunked-prefill")
    if args.swap_int8:
        engine_flags.append("--swap-int8")
    if not args.prefix_caching:
        engine_flags.append("--no-prefix-caching")
    if args.enforce_eager:
        engine_flags.append("--enforce-eager")
    if args.no_async_scheduling:
        engine_flags.append("--no-async-scheduling")
    if args.cluster_secret_file:  # TANDEM_CLUSTER_SECRET reaches the workers by inheritance
        engine_flags += ["--cluster-secret-file", args.cluster_secret_file]
    if args.decode_workers:
        kv = ["--kv-transfer", placement.kv_transfer]
        lease = ["--migration-lease", str(args.migration_lease)]
        roles = [
            ("prefill-worker", "prefill", [*engine_flags, "--device", d, *kv])
            for d in placement.prefill
        ] + [
            ("decode-worker", "decode", [*engine_flags, "--device", d, *kv, *lease])
            for d in placement.decode
        ]
    else:
        flags = [*engine_flags, "--colocated", "--device", placement.decode[0]]
        roles = [("decode-worker", "colocated", flags)]
    from tandem import serve

    return serve.serve(config.model, roles, args, parser)


def _install_uvloop() -> None:
    from tandem.serve import install_uvloop

    install_uvloop()


def _generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from tandem.request import SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            ignore_eos=args.ignore_eos,
        )
    except ValueError as e:
        message = str(e)
        for field in ("max_tokens", "temperature", "top_p", "top_k"):
            message = message.replace(field, "--" + field.replace("_", "-"))
        parser.error(message)
    llm = _build_llm(args, parser)
    start = time.perf_counter()
    outputs = llm.generate(args.prompts, params)
    elapsed = time.perf_counter() - start
    n_tokens = sum(len(o.token_ids) for o in outputs)
    for o in outputs:
        print(
            f"--- prompt: {o.prompt!r}\n{o.text}\n[{len(o.token_ids)} tokens, finish_reason={o.finish_reason}]"
        )
    print(
        f"generated {n_tokens} tokens for {len(outputs)} prompts in {elapsed:.2f}s ({n_tokens / max(elapsed, 1e-9):.1f} tok/s)"
    )
    return 0


def subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand (for its error messages and help)."""
    return parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "loadgen":  # its own parser (it has a `compare` subcommand)
        from loadgen.cli import main as loadgen_main

        return loadgen_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {
        "make-tiny-model": _make_tiny_model,
        "profile-cost-model": _profile_cost_model,
        "generate": _generate,
        "serve": _serve,
        "router": _router,
        "decode-worker": _decode_worker,
        "prefill-worker": _decode_worker,
    }
    sub_parser = subcommand_parser(parser, args.command)
    if args.command in _SERVICES:
        from tandem import logs

        try:
            logs.configure()
        except ValueError as e:
            sub_parser.error(str(e))
    return handlers[args.command](args, sub_parser)


if __name__ == "__main__":
    sys.exit(main())
