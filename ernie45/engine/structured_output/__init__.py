"""Structured output: grammar-constrained sampling (JSON schema, regex, choice, EBNF, structural tags)."""

from .backend import GrammarBackend, RequestGrammar, apply_token_bitmask, backend_class
from .manager import StructuredOutputManager, is_constrained
from .params import StructuredOutputsParams

__all__ = ["GrammarBackend", "RequestGrammar", "StructuredOutputManager", "StructuredOutputsParams",
           "apply_token_bitmask", "backend_class", "is_constrained"]
