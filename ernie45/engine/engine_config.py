"""Engine settings (vLLM's names), validated when built: the one place engine defaults live. `ernie45 serve`'s
engine flags are generated from the fields and their docstrings (`add_engine_arguments`), and `LLM(**kwargs)` takes
the same names.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import textwrap
import typing
from dataclasses import dataclass

DEFAULT_MAX_MODEL_LEN = 8192
DEFAULT_KV_CACHE_MEMORY = 1 << 30
STRUCTURED_OUTPUTS_BACKENDS = ("xgrammar",)


@dataclass
class EngineConfig:
    """How the engine batches and how much KV memory it holds."""

    max_num_seqs: int = 64
    """Most sequences running at once."""
    max_num_batched_tokens: int = 1024
    """Token budget of one step (decode tokens + prefill chunks); smaller means shorter steps, more chunking."""
    max_model_len: int | None = None
    """Longest prompt + output; None means min(max_position_embeddings, 8192)."""
    block_size: int = 16
    """Tokens per KV block."""
    num_kv_blocks: int | None = None
    """KV blocks to allocate; None means sized from kv_cache_memory."""
    kv_cache_memory: int | None = None
    """Bytes of KV memory when num_kv_blocks is None; None means the smaller of 1 GiB and what
    max_num_seqs full-length sequences need."""
    enable_prefix_caching: bool = True
    """Share the KV of identical prompt prefixes (full blocks) between requests."""
    seed: int | None = 0
    """Seed of the engine's RNG, which seeds requests that bring no seed of their own."""
    speculative_config: dict | None = None
    """Speculative decoding, as vLLM takes it: {"method": "ngram", "num_speculative_tokens": 4,
    "prompt_lookup_min": 1, "prompt_lookup_max": 4, "disable_by_batch_size": 4} (JSON on the command line).
    None: off."""
    structured_outputs_backend: str = "xgrammar"
    """Grammar library for structured output (JSON schema, regex, choice, grammar); vLLM's and FastDeploy's
    default."""
    tensor_parallel_size: int = 1
    """Processes that split each layer's heads, MLP width and vocabulary (torch.distributed over gloo; CPU only
    for now); each holds about 1/N of the weights and of the KV cache."""
    enable_expert_parallel: bool = False
    """MoE: place the routed experts across the tensor-parallel ranks (whole experts per rank) instead of
    splitting every expert's width."""
    expert_placement: str = "linear"
    """With enable_expert_parallel: "linear" (rank r holds a contiguous block of experts) or "round_robin"
    (expert e on rank e % N)."""
    data_parallel_size: int = 1
    """Engine replicas behind one server, each with its own KV cache; requests go to the least loaded (or back
    to the replica that took their 64-token prefix last, if it is nearly as free)."""
    nnodes: int = 1
    """Machines the tensor-parallel ranks span (ranks split evenly; node 0 runs the engine and the server)."""
    node_rank: int = 0
    """This machine's index in [0, nnodes); nodes other than 0 only run tensor-parallel workers."""
    master_addr: str = "127.0.0.1"
    """Address of node 0, where the ranks meet (torch.distributed's rendezvous)."""
    master_port: int | None = None
    """TCP port of the rendezvous on master_addr; None picks a free one (one node only)."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("max_model_len", "num_kv_blocks", "kv_cache_memory"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        from .spec_decode import SpeculativeConfig

        SpeculativeConfig.of(self.speculative_config)  # a bad field raises here, naming it
        if self.structured_outputs_backend not in STRUCTURED_OUTPUTS_BACKENDS:
            raise ValueError(f"structured_outputs_backend must be one of {', '.join(STRUCTURED_OUTPUTS_BACKENDS)}, "
                             f"got {self.structured_outputs_backend!r}")
        from ..parallel.config import check_parallel_fields

        check_parallel_fields(self)


def field_docs(cls) -> dict[str, str]:
    """{field: its docstring} from the class source (the string literal right after each annotated field)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field (`--max-num-seqs`; booleans as `--enable-prefix-caching` /
    `--no-enable-prefix-caching`), help from the field's docstring, default from the field."""
    docs = field_docs(EngineConfig)
    hints = typing.get_type_hints(EngineConfig)
    group = parser.add_argument_group("engine", "batching and KV cache (EngineConfig)")
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{docs.get(f.name, '')} (default: {f.default})".replace("%", "%%")
        kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])  # X | None
        if kind is dict:
            group.add_argument(flag, dest=f.name, type=_json_object, default=f.default, metavar="JSON",
                               help=help_text)
        elif kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                               help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=f.default, metavar="N" if kind is int else "NAME",
                               help=help_text)


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})
