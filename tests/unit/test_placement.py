"""Where `tandem serve` puts its workers, which KV backend it picks, and the flag errors."""

from __future__ import annotations

import pytest

from tandem.cli import main
from tandem.placement import Placement, parse_device, plan


def test_devices_are_normalised_and_bad_ones_name_the_flag():
    assert parse_device("cuda", "--device") == "cuda:0"
    assert parse_device(" cuda:03 ", "--device") == "cuda:3"
    for bad in ("gpu", "cuda:", "cuda:-1", "cuda:x", "cuda1", ""):
        with pytest.raises(ValueError, match="--decode-device must be cpu, cuda or cuda:N"):
            parse_device(bad, "--decode-device")


def test_colocated_runs_one_worker_on_device():
    assert plan("cuda:1") == Placement((), ("cuda:1",), "tcp")
    assert plan("cpu", kv_transfer="tcp").decode == ("cpu",)


def test_separate_gpus_pick_nccl_and_one_shared_gpu_picks_tcp():
    p = plan("cpu", 1, 1, "cuda:0", "cuda:1")
    assert p == Placement(("cuda:0",), ("cuda:1",), "nccl")
    assert plan("cuda", 1, 2).kv_transfer == "tcp"  # everything on cuda:0
    assert plan("cuda:0", 1, 1, decode_device="cpu").kv_transfer == "tcp"
    assert plan("cuda:0", 1, 1, "cuda:0", "cuda:1", kv_transfer="tcp").kv_transfer == "tcp"


def test_device_lists_are_dealt_round_robin():
    p = plan("cpu", 2, 4, "cuda:0,cuda:1", "cuda:2,cuda:3")
    assert p.prefill == ("cuda:0", "cuda:1")
    assert p.decode == ("cuda:2", "cuda:3", "cuda:2", "cuda:3") and p.kv_transfer == "nccl"
    # one shared GPU anywhere makes auto fall back to tcp
    assert plan("cpu", 2, 2, "cuda:0,cuda:1", "cuda:1,cuda:2").kv_transfer == "tcp"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(device="cuda:0", decode_device="cuda:1"), "--decode-device needs --prefill-workers"),
        (dict(device="cuda:0", kv_transfer="nccl"), "nccl needs disaggregated serving"),
        (dict(device="cuda:0", kv_transfer="rdma"), "--kv-transfer must be one of"),
        (
            dict(device="cpu", prefill_workers=1, decode_workers=1, kv_transfer="nccl"),
            "nccl needs every worker on a CUDA device",
        ),
        (
            dict(device="cuda:0", prefill_workers=1, decode_workers=1, kv_transfer="nccl"),
            "cuda:0 holds both a prefill and a decode worker",
        ),
        (
            dict(device="cpu", prefill_workers=1, decode_workers=1, prefill_device="cuda:0,cuda:1"),
            "--prefill-device lists 2 devices for 1 workers",
        ),
        (
            dict(device="cpu", prefill_workers=1, decode_workers=1, decode_device=","),
            "--decode-device must be cpu, cuda or cuda:N",
        ),
    ],
)
def test_impossible_placements_are_refused_naming_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(**kwargs)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["serve", "--prefill-workers", "1", "--decode-workers", "1", "--kv-transfer", "nccl"],
            "--kv-transfer nccl needs every worker on a CUDA device",
        ),
        (["serve", "--decode-device", "cuda:1"], "--decode-device needs --prefill-workers"),
        (["prefill-worker", "--kv-transfer", "nccl"], "--kv-transfer nccl needs --device cuda"),
        (["decode-worker", "--device", "cuda:3"], "this machine has 0 CUDA device"),
    ],
)
def test_cli_refuses_bad_placement_flags(argv, message, tiny_llama_dir, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--model", str(tiny_llama_dir), "--kv-blocks", "64"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
