"""``--enable-prefix-caching`` (the default) and ``--no-prefix-caching`` reach the engine."""

from __future__ import annotations

import pytest

from tandem.cli import _engine_config, build_parser


@pytest.mark.parametrize(
    ("flags", "on"),
    [([], True), (["--enable-prefix-caching"], True), (["--no-prefix-caching"], False)],
)
def test_prefix_caching_flags(flags, on, tiny_llama_dir):
    parser = build_parser()
    args = parser.parse_args(["decode-worker", "--model", str(tiny_llama_dir), *flags])
    assert _engine_config(args, parser).cache.enable_prefix_caching is on


def test_the_two_flags_exclude_each_other():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--enable-prefix-caching", "--no-prefix-caching"])
