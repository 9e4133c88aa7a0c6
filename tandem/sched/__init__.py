"""Scheduling (pure, no torch): the iteration scheduler and its policies (fcfs, mlfq, alise)."""
