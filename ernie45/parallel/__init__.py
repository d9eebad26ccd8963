"""Distributed serving on torch.distributed: tensor parallelism (heads, MLP width and vocabulary split across
processes), expert parallelism for MoE, and data-parallel engine replicas behind one server."""

from .driver import ParallelWorkerError, load_engine_model, run_node, shutdown

__all__ = ["ParallelWorkerError", "load_engine_model", "run_node", "shutdown"]
