"""Reproducible recipes that build models with ernie45's own toolkit."""
