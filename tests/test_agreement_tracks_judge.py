"""Slow (6 min 22 s on 2 cores): the agreement metric that names a run's best step ranks the run's checkpoints as
the judge does, and a LoRA of zeros scores below the trained one.

    python -m pytest -q -m slow tests/test_agreement_tracks_judge.py

Measured on this run (docs/watching.md): Spearman +0.87 (1 step) and +0.79 (4 steps) between PSNR and the judge's
prompt accuracy over 16 validated steps; the thresholds leave room for run-to-run noise of a 16-point ranking.
"""

from pathlib import Path

import pytest

from lcm_lora.config import TrainConfig, load_yaml
from lcm_lora.run_log import BEST_METRIC
from lcm_lora.trainer import train
from lcm_lora.world.dataset import write_imagefolder

ROOT = Path(__file__).parents[1]
MIN_SPEARMAN = 0.5


@pytest.mark.slow
def test_psnr_ranks_checkpoints_as_the_judge_does_and_beats_a_zero_lora(tmp_path):
    from tiny_world.agreement_vs_judge import correlate

    data = write_imagefolder(tmp_path / "world", 2000)
    # The recipe whose correlations docs/watching.md reports: tiny.yaml on N=20 with the per-element loss.
    flat = {**load_yaml(ROOT / "configs" / "tiny.yaml"), "num_ddim_timesteps": 20, "loss_type": "huber",
            "train_data_dir": str(data), "output_dir": str(tmp_path / "run"), "validation_steps": 25,
            "report_to": "none"}
    out = train(TrainConfig.from_flat_dict(flat))
    rows, spearman = correlate(out, [1, 4])
    zero, last = rows[0], rows[-1]
    for k in (1, 4):
        assert spearman[f"{BEST_METRIC}@{k}"] >= MIN_SPEARMAN, spearman
        assert zero[f"{BEST_METRIC}@{k}"] < last[f"{BEST_METRIC}@{k}"] - 1.0, (zero, last)  # dB
