"""The embedded default model: data, tokenizer, PT -> SFT -> DPO with `ernie45 train`, evaluation.

Run `python -m recipes.tiny.build OUT_DIR` (see recipes/tiny/README.md).
"""
