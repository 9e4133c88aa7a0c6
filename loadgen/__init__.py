"""Tandem's load generator: ``tandem loadgen`` / ``python -m loadgen``.

Works against any OpenAI-compatible streaming server and needs no engine (no torch).
Modules, in the order a run uses them: ``tokens`` (prompt texts of exact token lengths from a
local tokenizer folder), ``workloads`` and ``dataset`` (what to send), ``arrivals`` (when),
``client`` (one timed streaming request), ``runner`` (a bounded run), ``metrics`` (vLLM's
definitions), ``report`` and ``plots`` (table, results.json, requests.csv, PNGs), ``cli``
and ``compare`` (earlier runs and sweeps side by side).
"""
