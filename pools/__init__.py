"""Worker pools the stages share: vLLM engines, reward scorers and the log-prob scorer.

Each module holds its Ray actor (or task) and the function that creates and drives
the pool; stages read their inputs, call pools and write their outputs.
"""
