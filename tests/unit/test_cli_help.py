"""`tandem --help` and every subcommand's --help: descriptions, defaults, own flags only."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from tandem.cli import HelpFormatter, build_parser, subcommand_parser

COMMANDS = ("make-tiny-model", "profile-cost-model", "serve", "router", "decode-worker",
            "prefill-worker", "generate")  # fmt: skip


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_top_level_help_lists_every_command_with_a_line():
    out = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    flat = _flat(out)
    assert "serve the whole stack on this machine: the OpenAI API (router) and its worker" in flat
    for command in (*COMMANDS, "loadgen"):
        assert re.search(rf"^\s+{command}\s", out, re.M), (command, out)
    assert "`tandem COMMAND --help`" in flat


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_that_takes_a_value_shows_its_default(command):
    parser = subcommand_parser(build_parser(), command)
    assert parser.description, f"{command} has no description"
    formatter = HelpFormatter(command)
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0:  # positionals, switches, --help
            continue
        text = formatter._get_help_string(action) or ""
        assert "default" in text, f"tandem {command} {action.option_strings[0]}: {text!r}"
    assert "%(default)" not in parser.format_help()  # every placeholder was filled in


def test_help_shows_defaults_argparse_fills_in():
    serve = _flat(subcommand_parser(build_parser(), "serve").format_help())
    assert "--block-size BLOCK_SIZE tokens per KV block (default: 16)" in serve
    assert "--dtype {float32,float16,bfloat16} weights (default: float32)" in serve
    assert (
        "--max-num-batched-tokens MAX_NUM_BATCHED_TOKENS token budget per iteration (default: 2048)"
        in serve
    )
    assert "--access-log [FILE]" in serve and "--no-restart-workers" in serve
    assert serve.count("(default: 16)") == 1  # not said twice
    assert "Serve the OpenAI API on this machine" in serve  # its description


def test_profile_cost_model_lists_only_flags_that_change_a_profile():
    parser = subcommand_parser(build_parser(), "profile-cost-model")
    flags = {s for a in parser._actions for s in a.option_strings}
    assert flags == {
        "-h", "--help", "--model", "--device", "--dtype", "--block-size", "--kv-blocks",
        "--max-num-seqs", "--max-num-batched-tokens", "--gpu-memory-utilization",
        "--attention-backend", "--enforce-eager",
    }  # fmt: skip
    args = build_parser().parse_args(["profile-cost-model", "out.json"])
    # The serving-only settings keep their defaults, so the engine config still builds.
    assert (args.policy, args.cost_model, args.host_kv_blocks, args.swap_int8) == (
        "mlfq", None, 0, False,
    )  # fmt: skip
    with pytest.raises(SystemExit):
        build_parser().parse_args(["profile-cost-model", "out.json", "--policy", "fcfs"])


def test_formatter_leaves_switches_and_written_defaults_alone():
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--on", action="store_true", help="a switch")
    p.add_argument("--n", type=int, default=3, help="a number")
    p.add_argument("--m", type=int, default=3, help="a number (default: three)")
    text = _flat(p.format_help())
    assert "a switch (default" not in text
    assert "a number (default: 3)" in text
    assert "(default: three)" in text and "(default: three) (default" not in text
