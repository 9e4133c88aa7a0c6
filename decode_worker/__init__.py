"""Decode worker: the engine behind a msgpack control plane (see service.py)."""
