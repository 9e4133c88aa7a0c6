"""Start-up summaries (``tandem.summary``), the access log (``tandem.logs``), and the new
service modules staying pure."""

from __future__ import annotations

import logging
import subprocess
import sys

from tandem import logs, summary

HELLO = {"role": "decode", "model": "/m/tiny", "vocab_size": 2048, "max_model_len": 4096,
         "kv_blocks": 100, "block_size": 16, "host_kv_blocks": 50, "device": "cuda:1",
         "dtype": "bfloat16", "policy": "alise", "max_num_seqs": 8,
         "max_num_batched_tokens": 512, "chunked_prefill": False, "worker_id": "decode-1",
         "kv_address": "127.0.0.1:7000"}  # fmt: skip


def test_serve_summary_names_everything_an_operator_checks():
    text = summary.serve_summary(
        "http://127.0.0.1:8000", "tiny",
        [summary.WorkerLine("127.0.0.1:1", {**HELLO, "role": "prefill", "device": "cuda:0"},
                            pid=11, role="prefill"),
         summary.WorkerLine("127.0.0.1:2", HELLO, pid=12, role="decode")],
        limits=summary.limits_text(16, 30.0), restart=True, access_log="/var/log/a.log",
    )  # fmt: skip
    for part in ("tandem serve: 'tiny' at http://127.0.0.1:8000", "/m/tiny (vocab 2048, "
                 "max_model_len 4096)", "policy alise, 8 seqs and 512 tokens per iteration, "
                 "whole prefills", "16 requests in flight (then 429), 30 s per request",
                 "workers    2, one that dies is restarted with backoff",
                 "prefill  127.0.0.1:1  pid 11  cuda:0 bfloat16, KV 100 blocks x 16 tokens "
                 "= 1600 tokens, host tier 50 blocks", "decode   127.0.0.1:2  pid 12  cuda:1",
                 "access log /var/log/a.log", "curl -s http://127.0.0.1:8000/v1/completions"):  # fmt: skip
        assert part in text, (part, text)


def test_router_and_worker_summaries():
    text = summary.router_summary(
        "http://0.0.0.0:9000", "m", "/m", [summary.WorkerLine("10.0.0.2:5", None)],
        limits="L", registry="redis://r:6379", access_log=None,
    )  # fmt: skip
    assert "from redis://r:6379 (1 registered now)" in text
    assert "10.0.0.2:5  (not connected yet)" in text
    assert "access log off (--access-log to turn it on)" in text
    text = summary.worker_summary("decode-worker", "127.0.0.1:9", HELLO, None, 5.0)
    assert text.startswith("tandem decode-worker: decode worker listening on 127.0.0.1:9")
    assert "KV in      127.0.0.1:7000" in text
    assert "not in a registry: give the router --worker 127.0.0.1:9" in text


def test_access_log_to_a_file(tmp_path):
    path = tmp_path / "access.log"
    logger = logs.access_logger(str(path))
    assert logger is not None and not logger.propagate
    logger.info('127.0.0.1 "GET /health HTTP/1.1" 200')
    for h in logger.handlers:
        h.flush()
    assert '"GET /health HTTP/1.1" 200' in path.read_text()
    assert logs.access_logger(None) is None
    for h in list(logger.handlers):
        h.close()
        logger.removeHandler(h)
    logging.getLogger("tandem.access").propagate = True


def test_service_modules_do_not_import_torch():
    code = ("import sys, tandem.supervisor, tandem.summary, tandem.logs, tandem.serve, "
            "tandem.tinymodel.files, router.workers, router.metrics; "
            "assert 'torch' not in sys.modules")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)
