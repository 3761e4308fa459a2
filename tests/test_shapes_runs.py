"""The testbed's named configs: shapes-one-object trains (its own data, model and optimiser settings, a smaller batch)
and its loss falls on fresh scenes."""
import json

import numpy as np
import torch

import train
from shapes.runs import SHAPES_CONFIGS

torch.set_num_threads(1)


def test_shapes_one_object_trains_and_its_loss_falls(tmp_path):
    """60 steps of 8 new single-object scenes each (no scene repeats): the last 10 logged losses average below 0.6 x
    the first step's (measured: 2.01 -> 0.74, the mean of steps 51-60; a zero-initialised output starts at
    1.5 E||eps - x0||^2 with the IG term)."""
    preset = SHAPES_CONFIGS["shapes-one-object"]
    train.main(["--config", "shapes-one-object", "--batch-size", "8", "--steps", "60", "--checkpoint-every", "60",
                "--log-every", "1", "--out", str(tmp_path)])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines]
    assert len(losses) == 60 and np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.6 * losses[0]
    config = json.loads((tmp_path / "log.txt").read_text().split("config ", 1)[1].splitlines()[0])
    assert config["shapes_max_objects"] == preset["shapes_max_objects"] == 1
