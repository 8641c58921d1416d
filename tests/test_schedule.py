"""Learning-rate schedules (prge.zo.schedule.lr_at): the values every loop uses, and the config check."""

import math

import pytest

from prge.config import TrainConfig
from prge.errors import PrgeError
from prge.zo.schedule import lr_at


def test_values():
    assert [lr_at(0.1, "constant", t, 4) for t in (0, 1, 4)] == [0.1, 0.1, 0.1]
    assert [lr_at(0.1, "linear", t, 4) for t in (1, 2, 3, 4)] == pytest.approx([0.1, 0.075, 0.05, 0.025])
    assert lr_at(0.1, "cosine", 1, 4) == 0.1 and lr_at(0.1, "cosine", 3, 4) == pytest.approx(0.05)
    assert lr_at(0.1, "cosine", 4, 4) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.75)))
    assert lr_at(0.1, "linear", 0, 4) == 0.1  # step 0: no g yet
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_at(0.1, "step", 1, 4)


def test_config_refuses_an_unknown_schedule():
    with pytest.raises(PrgeError, match="lr schedule 'exp'"):
        TrainConfig(lr_schedule="exp").check()
    assert TrainConfig(lr_schedule="cosine").check().lr_schedule == "cosine"


def test_device_train_refuses_an_unknown_schedule(tmp_path):
    from prge.engine.runtime import device_train

    with pytest.raises(PrgeError, match="lr schedule 'exp'"):  # before it opens any file
        device_train(tmp_path / "none.pte", tmp_path / "none.safetensors", tmp_path / "run", steps=1, lr=1e-3,
                     eps=1e-2, lr_schedule="exp", progress=False)
