"""lcm-lora: distill LCM-LoRA adapters for Stable Diffusion teachers, and use them.

The few functions a user needs, importable from the package (each is loaded on first use, so `import lcm_lora`
stays light):

    from lcm_lora import TrainConfig, train, load_lcm_pipeline, generate, export_lora_files, merge_lora

    config = TrainConfig.from_yaml("configs/tiny.yaml", train_data_dir="data/tiny-world", max_train_steps=100)
    out = train(config)                                   # the folder holding pytorch_lora_weights.safetensors
    pipe = load_lcm_pipeline("teacher-eps", out)           # base model + LCMScheduler + the LoRA, as users load it
    images = generate(pipe, ["a red circle at the top left on a plain background"], num_inference_steps=4,
                      guidance_scale=1.0, seed=0)         # PIL images
    export_lora_files(out, "exported/", ["kohya"])         # any layout, from a run, a checkpoint or a LoRA file
    merge_lora("model.safetensors", out, "merged.safetensors", "path/to/model-configs")   # bake into a single file

- `TrainConfig`: every flag of `lcm-lora train`, typed (`from_yaml`, `from_flat_dict`, `validate`).
- `train(config)`: checks everything before loading weights, distills, exports; returns the output folder.
- `load_lcm_pipeline(model, lora, device, dtype, ...)`: a hub id, folder, bundled teacher or single file.
- `generate(pipe, prompts, num_inference_steps, guidance_scale, seed, height, width)`: one image per prompt.
- `export_lora_files(source, out_dir, formats, dtype, ...)`, `merge_lora(checkpoint, lora, output, config_dir)`.
"""

from __future__ import annotations

import importlib

_API = {
    "TrainConfig": "lcm_lora.config",
    "train": "lcm_lora.trainer",
    "load_lcm_pipeline": "lcm_lora.inference",
    "generate": "lcm_lora.inference",
    "export_lora_files": "lcm_lora.convert",
    "merge_lora": "lcm_lora.convert",
}
__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'lcm_lora' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
