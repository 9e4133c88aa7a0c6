"""Tandem's load generator: workloads, arrivals, client, metrics and reports.

So far: ``loadgen.workloads`` (synthetic length distributions and arrival processes),
used by the scheduler simulator in ``bench/sched_sim.py``.
"""
