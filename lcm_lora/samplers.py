"""The stock diffusers scheduler each --method's LoRA is sampled with, written into the LoRA's metadata and read back
by `generate`, validation, `compare` and the model card.

lcm: LCMScheduler on the run's grid (LCM, arXiv 2310.04378). tcd: TCDScheduler on the run's grid, gamma (the
pipeline's `eta`) 0.3 as diffusers' TCD guide uses it (TCD, arXiv 2402.19159). pcm: DDIMScheduler with trailing
timesteps, which are the phase edges, and without clipping or alpha 1 at the end, as PCM's model card loads its
LoRAs (PCM, arXiv 2405.18407); eta 0 (deterministic DDIM).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

SCHEDULERS = {"lcm": "LCMScheduler", "tcd": "TCDScheduler", "pcm": "DDIMScheduler"}
TCD_GAMMA = 0.3
PCM_DDIM = {"timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": False}
# ComfyUI (sampler, scheduler) and A1111 / Forge sampler for each method's LoRA; TCD has no core sampler in either.
UI_SAMPLERS = {"lcm": ("lcm", "sgm_uniform", "LCM"), "tcd": ("euler_ancestral", "sgm_uniform", "Euler a"),
               "pcm": ("ddim", "sgm_uniform", "DDIM")}


@dataclass(frozen=True)
class Sampler:
    method: str = "lcm"
    settings: dict = field(default_factory=dict)  # from_config arguments of the scheduler
    eta: float = 0.0  # the pipeline's eta: TCD's gamma, DDIM's eta
    steps: int | None = None  # the step count the LoRA is made for (pcm: its phases), None: any

    @property
    def scheduler(self) -> str:
        return SCHEDULERS[self.method]


def for_config(config_flat: dict) -> Sampler:
    """How a run's LoRA is sampled, from its flat config (absent keys take their defaults: an older run is lcm)."""
    method, c = config_flat.get("method", "lcm"), config_flat
    grid = {"original_inference_steps": c["num_ddim_timesteps"]} if "num_ddim_timesteps" in c else {}
    if method == "tcd":
        return Sampler("tcd", grid, TCD_GAMMA)
    if method == "pcm":
        return Sampler("pcm", dict(PCM_DDIM), 0.0, int(c.get("multiphase", 1)))
    scaling = {"timestep_scaling": c["timestep_scaling_factor"]} if "timestep_scaling_factor" in c else {}
    return Sampler("lcm", {**grid, **scaling})


def to_metadata(sampler: Sampler) -> dict[str, str]:
    values = {"lcm_lora.method": sampler.method, "lcm_lora.scheduler": sampler.scheduler,
              "lcm_lora.scheduler_settings": json.dumps(sampler.settings, sort_keys=True),
              "lcm_lora.eta": sampler.eta, "lcm_lora.inference_steps": sampler.steps}
    return {k: str(v) for k, v in values.items() if v is not None}


def from_metadata(meta: dict[str, str], lcm_settings: dict) -> Sampler:
    """The sampler a LoRA's metadata names; `lcm_settings` (LCMScheduler arguments read from the older keys) for a
    LoRA that names none, which lcm-lora wrote before methods existed or which comes from elsewhere."""
    method = meta.get("lcm_lora.method", "lcm")
    if method not in SCHEDULERS:
        raise ValueError(f"lcm_lora.method {method!r} is not one of {tuple(SCHEDULERS)}")
    if method == "lcm":
        return Sampler("lcm", lcm_settings)
    settings = json.loads(meta.get("lcm_lora.scheduler_settings", "{}"))
    steps = meta.get("lcm_lora.inference_steps")
    return Sampler(method, settings, float(meta.get("lcm_lora.eta", 0.0)), int(steps) if steps else None)
