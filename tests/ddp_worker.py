"""Launched by torchrun from test_engine.py: train 2 epochs with FixNorm on 2 ranks, save each rank's weights."""
import sys
from pathlib import Path

import torch

from fixnorm.train import Trainer, load_recipe, make_config

out = Path(sys.argv[1])
# 8 steps: a 3-step free phase ends inside the run, so the ranks must agree on it and on the norms it took
cfg = make_config(load_recipe("fmnist-smoke"), {"train_subset": 800, "holdout": 500, "epochs": 2, "threads": 1, "free_steps": 3})
trainer = Trainer(cfg, out / "run")
rank = trainer.dist.rank
if rank == 0:
    out.mkdir(parents=True, exist_ok=True)
    torch.save(trainer.model.state_dict(), out / "initial.pt")
trainer.fit()
torch.save(trainer.model.state_dict(), out / f"rank{rank}.pt")
