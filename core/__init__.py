"""The ground floor: what every other part of the pipeline builds on, importing nothing of theirs.

Config types and their checks, the run layout and Parquet schemas, errors, seeds, statistics,
timing, the models and prompts a run reads, the chat rendering, the objectives' math, the GPU
layout and worker progress bars. Everything above (rewards, pools, stages, the command line in
pipeline/) imports from here; nothing here imports from them.
"""
