"""Where ``tandem serve`` puts its worker processes, and how their KV moves (pure).

- Colocated (one worker): ``--device`` (``cpu``, ``cuda`` or ``cuda:N``).
- Disaggregated (``--prefill-workers P --decode-workers D``): every worker on ``--device``,
  unless ``--prefill-device`` / ``--decode-device`` give a pool its own devices: a comma
  list, dealt round-robin to the pool's workers (``--decode-workers 4 --decode-device
  cuda:1,cuda:2`` puts two decode workers on each GPU).
- ``--kv-transfer auto`` (default) hands KV over NCCL when every worker is on a GPU and no
  GPU holds both a prefill and a decode worker (NCCL cannot join two processes on one GPU),
  and over TCP otherwise; ``tcp`` and ``nccl`` force a backend (``nccl`` is refused where it
  cannot work, naming the flags).

Each child gets ``--device cuda:N`` and selects that GPU itself (``torch.cuda.set_device``)
before anything touches CUDA; all GPUs stay visible to every worker, so NCCL finds its
peer-to-peer path. Errors are ``ValueError`` with a message naming the flag.
"""

from __future__ import annotations

from dataclasses import dataclass

KV_TRANSFERS = ("auto", "tcp", "nccl")


def parse_device(value: str, flag: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``, normalised (``cuda`` is ``cuda:0``)."""
    v = value.strip()
    if v == "cpu":
        return v
    if v == "cuda":
        return "cuda:0"
    kind, sep, index = v.partition(":")
    if kind == "cuda" and sep and index.isdigit():
        return f"cuda:{int(index)}"
    raise ValueError(f"{flag} must be cpu, cuda or cuda:N (or a comma list of them), got {value!r}")


def parse_devices(value: str, flag: str) -> list[str]:
    devices = [parse_device(v, flag) for v in value.split(",")] if value.strip() else []
    if not devices:
        raise ValueError(f"{flag} needs at least one device")
    return devices


@dataclass(frozen=True)
class Placement:
    prefill: tuple[str, ...]  # device of each prefill worker
    decode: tuple[str, ...]  # device of each decode worker (the colocated worker, if no pools)
    kv_transfer: str  # tcp or nccl (meaningful with pools only)


def plan(
    device: str,
    prefill_workers: int = 0,
    decode_workers: int = 0,
    prefill_device: str | None = None,
    decode_device: str | None = None,
    kv_transfer: str = "auto",
) -> Placement:
    """The placement of ``tandem serve``'s workers; ``ValueError`` naming the flag."""
    base = parse_device(device, "--device")
    if kv_transfer not in KV_TRANSFERS:
        raise ValueError(
            f"--kv-transfer must be one of {', '.join(KV_TRANSFERS)}, got {kv_transfer!r}"
        )
    if not decode_workers:
        for flag, value in (
            ("--prefill-device", prefill_device),
            ("--decode-device", decode_device),
        ):
            if value is not None:
                raise ValueError(f"{flag} needs --prefill-workers and --decode-workers")
        if kv_transfer == "nccl":
            raise ValueError(
                "--kv-transfer nccl needs disaggregated serving (--prefill-workers and --decode-workers)"
            )
        return Placement((), (base,), "tcp")
    pools = {}
    for flag, value, count in (
        ("--prefill-device", prefill_device, prefill_workers),
        ("--decode-device", decode_device, decode_workers),
    ):
        devices = parse_devices(value, flag) if value is not None else [base]
        if len(devices) > count:
            raise ValueError(f"{flag} lists {len(devices)} devices for {count} workers")
        pools[flag] = tuple(devices[i % len(devices)] for i in range(count))
    prefill, decode = pools["--prefill-device"], pools["--decode-device"]
    on_gpus = all(d.startswith("cuda") for d in prefill + decode)
    shared = sorted(set(prefill) & set(decode))
    if kv_transfer == "nccl":
        if not on_gpus:
            raise ValueError(
                "--kv-transfer nccl needs every worker on a CUDA device "
                "(see --device, --prefill-device, --decode-device)"
            )
        if shared:
            raise ValueError(
                f"--kv-transfer nccl: {', '.join(shared)} holds both a prefill and a decode "
                "worker, and NCCL cannot connect two processes on one GPU; give "
                "--prefill-device and --decode-device different GPUs, or use --kv-transfer tcp"
            )
    if kv_transfer == "auto":
        kv_transfer = "nccl" if on_gpus and not shared else "tcp"
    return Placement(prefill, decode, kv_transfer)
