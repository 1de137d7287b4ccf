"""Validation during training: the LoRA as exported, loaded into the teacher's pipeline with load_lora_weights, drawn
at each --validation_inference_steps under its own scheduler (LCMScheduler for --method lcm) and scored against
the teacher (lcm_lora.agreement).

Each validation writes validation/step-N/: the LoRA, <k>-steps.png (the LoRA's images) and sheet-<k>-steps.png (a
row per prompt: teacher reference, teacher at k, LoRA at k). The teacher's samples are drawn once per run, kept in
validation/teacher-samples.safetensors, and reused by later validations and resumed runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from PIL import Image

from . import agreement
from .config import TrainConfig
from .inference import load_base_pipeline, make_grid, use_lcm_lora
from .models import teacher_fingerprint

TEACHER_SAMPLES = "teacher-samples.safetensors"
LORA_GUIDANCE = 1.0  # LCM-LoRA is sampled without CFG: the guidance is distilled into it


def reference_spec(config: TrainConfig) -> agreement.ReferenceSpec:
    run, d = config.run, config.data
    return agreement.ReferenceSpec(
        teacher=json.dumps(teacher_fingerprint(config.model), sort_keys=True), prompts=tuple(run.validation_prompts),
        seeds=tuple((run.seed or 0) + i for i in range(len(run.validation_prompts))), height=d.resolution,
        width=d.resolution, guidance_scale=agreement.reference_guidance(config.distill.w_min, config.distill.w_max),
        reference_steps=run.validation_teacher_steps)


def validate(config: TrainConfig, lora_dir: Path, step: int, device: str) -> tuple[dict, dict[str, Image.Image]]:
    """(the metrics.jsonl record, {tracker name: image}) of the LoRA in `lora_dir`, trained `step` steps."""
    started = time.perf_counter()
    spec = reference_spec(config)
    pipe = load_base_pipeline(config.model.pretrained_teacher_model, config.model.single_file_config).to(device)
    pipe.set_progress_bar_config(disable=True)
    kept = agreement.TeacherSamples(lora_dir.parent / TEACHER_SAMPLES, spec)
    teacher_started = time.perf_counter()
    ks = config.run.validation_inference_steps
    reference, teacher_k = kept.get(pipe), {k: kept.get(pipe, k) for k in ks}
    teacher_seconds = time.perf_counter() - teacher_started
    sampler = use_lcm_lora(pipe, lora_dir, config.distill.num_ddim_timesteps, config.distill.timestep_scaling_factor)
    lcm, prompts, seeds = pipe.scheduler, list(spec.prompts), list(spec.seeds)

    ref_images = agreement.decode(pipe, reference)
    record = {"reference": {"scheduler": "DDIM trailing", "steps": spec.reference_steps,
                            "guidance_scale": spec.guidance_scale},
              "lora_guidance_scale": LORA_GUIDANCE, "lora_scheduler": sampler.scheduler, "lora_eta": sampler.eta,
              "lora": {}, "teacher": {}}
    images = {}
    for k in ks:
        lora = agreement.sample(pipe, lcm, prompts, seeds, (spec.height, spec.width), k, LORA_GUIDANCE, sampler.eta)
        lora_images, teacher_images = agreement.decode(pipe, lora), agreement.decode(pipe, teacher_k[k])
        record["lora"][str(k)] = agreement.mean_scores(agreement.scores(lora, lora_images, reference, ref_images))
        record["teacher"][str(k)] = agreement.mean_scores(
            agreement.scores(teacher_k[k], teacher_images, reference, ref_images))
        pictures = {name: agreement.to_pil(x) for name, x in
                    (("ref", ref_images), ("teacher", teacher_images), ("lora", lora_images))}
        make_grid(pictures["lora"], columns=len(prompts)).save(lora_dir / f"{k}-steps.png")
        cfg = f"cfg {spec.guidance_scale:g}"
        images[f"validation/{k}_steps"] = agreement.sheet({
            f"teacher {spec.reference_steps} {cfg}": pictures["ref"], f"teacher {k} {cfg}": pictures["teacher"],
            f"LoRA {k}": pictures["lora"]})
        images[f"validation/{k}_steps"].save(lora_dir / f"sheet-{k}-steps.png")
    record["seconds"] = round(time.perf_counter() - started, 3)
    record["teacher_seconds"] = round(teacher_seconds, 3)
    record["teacher_samples_drawn"] = kept.drawn  # empty when all were kept from an earlier validation
    return {"step": step, "validation": record}, images


def tracker_scalars(record: dict) -> dict[str, float]:
    """agreement/<metric>/{lora,teacher}_<k>_steps, for Accelerate's trackers."""
    v = record["validation"]
    return {f"agreement/{metric}/{who}_{k}_steps": value
            for who in ("lora", "teacher") for k, values in v[who].items() for metric, value in values.items()}
