"""Stage 1, precompute: the reference model's log-probs for every preference pair, cached as Parquet.

pipeline.py   precompute(): the per-split Ray Data plan
prepare.py    prepare_batch(): raw rows validated and tokenized, or rejected with a reason; the row checks
scorer.py     ReferenceScorer: the reference model as a plain callable class for map_batches
sink.py       CacheSink: part files and their accounting; finish(): verify, then the manifest last
output.py     the split directory as a run finds it (up to date, resumable, other inputs)
splits.py     where the train and eval splits come from; an eval split carved from the training data
"""

from raydpo.precompute_stage.pipeline import PrecomputeResult, SplitResult, precompute
from raydpo.precompute_stage.prepare import PREPARED_SCHEMA, prepare_batch
from raydpo.precompute_stage.scorer import ReferenceScorer
from raydpo.precompute_stage.sink import CacheSink

__all__ = [
    "PREPARED_SCHEMA",
    "CacheSink",
    "PrecomputeResult",
    "ReferenceScorer",
    "SplitResult",
    "precompute",
    "prepare_batch",
]
