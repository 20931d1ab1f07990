"""Compaction: from a pruned model to a physically smaller one, saved and loaded again.

- :mod:`~hfprune.compaction.compact`: removing pruned layers, heads and neurons from a copy, checked on a
probe batch.
- :mod:`~hfprune.compaction.loading`: :func:`load_compacted`, for checkpoints whose per-layer sizes a stock
config cannot state.
- :mod:`~hfprune.compaction.structure`: what is left of each layer of a model, as ``hfprune report`` shows it.
- :mod:`~hfprune.compaction.sparse_file`: a smaller file for unstructured zeros (bitmask plus values).
- :mod:`~hfprune.compaction.conformance`: the conformance kit for architecture adapters (pytest checks).

Nothing is imported here: ``import hfprune`` loads only :mod:`~hfprune.compaction.compact`,
and the loader (which imports transformers) waits until it is used.
"""
