"""Data: from a ``data.source`` to token blocks and a leak-free train/validation split.

Modules (private): ``_sources`` (built-in corpora, text, JSONL, local ``datasets``
folders), ``_blocks`` (the document split with its overlap check, packing into blocks, the
deterministic batch sampler), ``_tokenizer`` (the built-in teacher's BPE tokenizer).
"""
