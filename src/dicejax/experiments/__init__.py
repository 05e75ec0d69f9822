"""The paper's experiments (and ours) as functions returning data, used by the CLI."""

from dicejax.experiments.common import RunConfig, Setup, build, save_json
from dicejax.experiments.train import TrainResult, evaluate, train

__all__ = ["RunConfig", "Setup", "TrainResult", "build", "evaluate", "save_json", "train"]
