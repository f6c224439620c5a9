"""Diffusion engine: schedules, forward process, objectives, samplers, guidance."""

from wdmjax.diffusion.guidance import guided_model_fn
from wdmjax.diffusion.objectives import OBJECTIVES, diffusion_loss, eps_from_x0, target, to_x0_eps
from wdmjax.diffusion.process import coef_at, q_posterior, q_sample, sample_timesteps
from wdmjax.diffusion.samplers import SAMPLERS, ddim_sample, ddpm_sample, sample
from wdmjax.diffusion.schedules import (
                                         Schedule,
                                         check_steps,
                                         cosine_betas,
                                         linear_betas,
                                         make_schedule,
                                         respaced_timesteps,
                                         schedule_from_betas,
)

__all__ = [
    "OBJECTIVES", "SAMPLERS", "Schedule", "check_steps", "cosine_betas", "ddim_sample",
    "ddpm_sample", "coef_at", "diffusion_loss", "eps_from_x0", "guided_model_fn", "linear_betas",
    "make_schedule", "q_posterior", "q_sample", "respaced_timesteps", "sample",
    "sample_timesteps", "schedule_from_betas", "target", "to_x0_eps",
]
