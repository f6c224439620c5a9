"""The training engine: state, jitted step, loop, Orbax checkpoints, sampling, planning.

It trains any loss on any split of the parameters and knows no method: WDM, DiffFit and
the attacks supply their losses and parameter splits from above.
"""

from wdmjax.train.checkpoint import Checkpointer
from wdmjax.train.derived import Setup, setup
from wdmjax.train.images import make_grid, save_grid, save_panels
from wdmjax.train.loop import init_state, load_params, load_trained, train, write_final_samples
from wdmjax.train.sampling import sample_images
from wdmjax.train.state import TrainState, create_train_state, make_optimizer
from wdmjax.train.step import LossFn, make_train_step, train_step

__all__ = [
    "Checkpointer", "LossFn", "Setup", "TrainState", "create_train_state", "init_state",
    "load_params", "load_trained", "make_grid", "make_optimizer", "make_train_step",
    "sample_images", "save_grid", "save_panels", "setup", "train", "train_step",
    "write_final_samples",
]
