"""The reference stage: each list item's log-prob under the round's reference, stored beside the lists.

The trainer then holds no reference model: it reads `ref_logp` from the train
shard. Where it runs is decided once, at planning (`placement.py`, carried in
the round plan as `reference_in_train_workers`):

- its own Ray task (`stage.py`, `run_stage`; the task in `task.py`), or
- inside the train stage's workers, when the reference is the policy they
  load to train anyway (`in_train_workers.py`).

Either way the same lists are scored (`lists.py`) with the trainer's log-prob
math and settings (pools/logprob_scorer.py, one LogprobSpec), and the same
`train/part-00000.parquet` and `_done/reference` are written.

This package's modules other than stage.py and task.py import no Ray: the
train workers' loop imports `in_train_workers`, and `make gpu-check` imports
that loop on a machine without Ray.
"""
