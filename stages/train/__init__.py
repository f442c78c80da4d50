"""The trainer stage: LarPO objectives (objectives.py), log-probs (logprobs.py), loop (loop.py)."""
