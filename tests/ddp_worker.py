"""A tiny DDP run for tests/test_train.py: launched by torch.distributed.run with 2 CPU processes.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT.json
Rank 0 writes the loss history and a digest of the final weights to OUT.json.
"""
import json, sys
import torch

torch.set_num_threads(1)  # two processes share two cores

from tinyllama.model import LLM
from tinyllama.train import train

sys.path.insert(0, __import__("os").path.dirname(__file__))
from _train_setup import tiny_setup  # noqa: E402  (the same model, data and config as the 1-process run)

model, data, config = tiny_setup()
result = train(model, data, config, progress=False)
if torch.distributed.is_available() and int(__import__("os").environ.get("RANK", 0)) == 0:
    weights = {k: v.tolist() for k, v in model.state_dict().items()}
    json.dump({"losses": result.losses(), "weights": weights, "steps": result.steps_done}, open(sys.argv[1], "w"))
