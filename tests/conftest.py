import os

import pytest

# Tests never talk to W&B servers or model hubs.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Some tests compose configs with Hydra's own API, as a user's own app would: that
# needs the schema and resolvers registered first, as trackstar-run does.
from trackstar.experiment.compose import register  # noqa: E402

register()


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory):
    from trackstar.world import build_world, load_world

    path = build_world(tmp_path_factory.mktemp("worlds") / "micro-s0", "micro", 0)
    return load_world(path)


@pytest.fixture(scope="session")
def micro_checkpoint_dir(micro_world, tmp_path_factory):
    """Final checkpoint of a micro GPT-2 pretrained on the micro world, once per session:
    pretraining is the slow part of every test that needs a model."""
    from trackstar.lm import PretrainConfig, final_checkpoint, pretrain_model

    run = pretrain_model(micro_world.path, tmp_path_factory.mktemp("models") / "micro", PretrainConfig.preset("micro"), progress=False)
    return final_checkpoint(run)


@pytest.fixture
def checkpoint(micro_checkpoint_dir):
    """The micro checkpoint, loaded afresh for each test: tests may change its
    weights, optimizer state or mode."""
    from trackstar.lm import load_checkpoint

    return load_checkpoint(micro_checkpoint_dir)


@pytest.fixture(scope="module")
def tokenizer():
    """test_attribution's word-level tokenizer (a module's fixtures may build on it)."""
    from test_attribution import make_tokenizer

    return make_tokenizer()
