"""The few-second training run that trainer tests vary: the bundled epsilon teacher at 64x64, rank 4."""

from pathlib import Path

from lcm_lora.config import TrainConfig


def tiny_config(data_dir: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(pretrained_teacher_model="teacher-eps", train_data_dir=str(data_dir), resolution=64,
                  train_batch_size=4, max_train_steps=2, lora_rank=4, lora_alpha=8, learning_rate=1e-3,
                  lr_warmup_steps=0, checkpointing_steps=1, report_to="none", output_dir=str(out), seed=0,
                  export_dtype="fp32")
    return TrainConfig.from_flat_dict({**values, **overrides})
