"""The training engine: state, jitted step, loop, Orbax checkpoints, configs, sampling."""

from wdmjax.train.checkpoint import Checkpointer
from wdmjax.train.config import apply_override, default_config, load_config, validate
from wdmjax.train.images import make_grid, save_grid
from wdmjax.train.loop import default_loss, init_state, load_trained, read_config, train
from wdmjax.train.sampling import model_from_config, sample_images, schedule_from_config
from wdmjax.train.state import TrainState, create_train_state, make_optimizer
from wdmjax.train.step import make_train_step, train_step

__all__ = [
    "Checkpointer", "TrainState", "apply_override", "create_train_state", "default_config",
    "default_loss", "init_state", "load_config", "load_trained", "make_grid", "make_optimizer",
    "make_train_step", "model_from_config", "read_config", "sample_images", "save_grid",
    "schedule_from_config", "train", "train_step", "validate",
]
