import os

import pytest

# Tests never talk to W&B servers or model hubs.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory):
    from trackstar.world import build_world, load_world

    path = build_world(tmp_path_factory.mktemp("worlds") / "micro-s0", "micro", 0)
    return load_world(path)


@pytest.fixture(scope="session")
def micro_checkpoint_dir(micro_world, tmp_path_factory):
    """Final checkpoint of a micro GPT-2 pretrained on the micro world (a few seconds)."""
    from trackstar.lm import PretrainConfig, final_checkpoint, pretrain_model

    run = pretrain_model(micro_world.path, tmp_path_factory.mktemp("models") / "micro", PretrainConfig.preset("micro"), progress=False)
    return final_checkpoint(run)
