"""The trainer stage: the loop each Ray Train worker runs (loop.py), its data (data.py), optimizer
(optim.py) and in-training checkpoints (checkpoint.py); stage.py starts it."""
