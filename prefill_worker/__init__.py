"""Prefill worker service: chunked prefill, then KV handoff to a decode worker."""
