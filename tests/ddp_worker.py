"""A tiny DDP run for tests/test_train.py: launched by torch.distributed.run with 2 CPU processes.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT.json [ragged]
Rank 0 writes the loss history and a digest of the final weights to OUT.json. With `ragged`, the rows
keep different numbers of targets (tests/_train_setup.RaggedTargets) and each step accumulates two
micro-batches, so ranks and micro-batches hold very different numbers of target tokens.
"""
import json, os, sys
import torch

torch.set_num_threads(1)  # two processes share two cores

from tinyllama.train import train

sys.path.insert(0, os.path.dirname(__file__))
from _train_setup import tiny_setup  # noqa: E402  (the same model, data and config as the 1-process run)

ragged = sys.argv[2:] == ["ragged"]
model, data, config = tiny_setup(ragged=ragged, **({"grad_accum_steps": 2} if ragged else {}))
result = train(model, data, config, progress=False)
if int(os.environ.get("RANK", 0)) == 0:
    weights = {k: v.tolist() for k, v in model.state_dict().items()}
    json.dump({"losses": result.losses(), "weights": weights, "steps": result.steps_done}, open(sys.argv[1], "w"))
