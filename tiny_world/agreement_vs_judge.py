"""Does agreement with the teacher track quality? Over the validated steps of one training run, rank each step's
LoRA by the run's agreement metrics (metrics.jsonl) and by the judge's prompt accuracy, and report the rank
correlation; a LoRA of zeros (the teacher itself under LCMScheduler) is scored the same way as the control.

    python train_lcm_lora.py --config configs/tiny.yaml --num_ddim_timesteps 20 --loss_type huber \
        --validation_steps 25 --output_dir output/tiny-eps-watch   # the run docs/watching.md measured
    python -m tiny_world.agreement_vs_judge --run output/tiny-eps-watch --steps 1 4

The judge draws each LoRA on every held-out prompt (192, one seed each) at guidance 1, as the run's validation does.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from lcm_lora.agreement import METRICS
from lcm_lora.config import TrainConfig
from lcm_lora.export import DIFFUSERS_WEIGHT_NAME
from lcm_lora.inference import load_lcm_pipeline
from lcm_lora.run_log import MetricsLog, validation_dir
from lcm_lora.safetensors_io import read_safetensors, save_safetensors_atomic
from lcm_lora.validation import validate

from .quality import Scorer, generate, held_out_prompts


def ranks(values: list[float]) -> np.ndarray:
    """Ranks from 1, ties given their mean rank."""
    values = np.asarray(values, dtype=float)
    order = values.argsort(kind="stable")
    r = np.empty(len(values))
    r[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):
        r[values == v] = r[values == v].mean()
    return r


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks."""
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def judge_accuracy(teacher: str, lora: Path, steps: int, scorer: Scorer) -> float:
    pipe = load_lcm_pipeline(teacher, lora)
    scenes = held_out_prompts(1)
    return scorer.score(generate(pipe, scenes, steps, 1.0), scenes, "lcm", steps, 1.0).prompt_accuracy


def zero_lora(run: Path, step: int, folder: Path) -> Path:
    """The run's LoRA file with every weight zeroed: the adapter adds nothing."""
    tensors, meta = read_safetensors(validation_dir(run, step) / DIFFUSERS_WEIGHT_NAME)
    folder.mkdir(parents=True, exist_ok=True)
    zeros = {k: v if k.endswith(".alpha") else torch.zeros_like(v) for k, v in tensors.items()}
    save_safetensors_atomic(zeros, folder / DIFFUSERS_WEIGHT_NAME, meta)
    return folder


def correlate(run: Path, steps: list[int]) -> tuple[list[dict], dict[str, float]]:
    """(a row per LoRA: the zero LoRA first, then each validated step, with its metrics and judge accuracy at each of
    `steps`; Spearman's correlation of each metric with the judge over the validated steps)."""
    config = TrainConfig.from_flat_dict(yaml.safe_load((run / "config.yaml").read_text()))
    teacher = config.model.pretrained_teacher_model
    validations = MetricsLog(run).validations()
    scorer = Scorer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        zero = zero_lora(run, validations[-1]["step"], Path(tmp) / "zero" / "lora")
        zero_record, _ = validate(config, zero, 0, "cpu")
        for label, record, lora in [("zero LoRA", zero_record, zero)] + [
                (str(r["step"]), r, validation_dir(run, r["step"])) for r in validations]:
            row = {"step": label}
            for k in steps:
                row.update({f"{m}@{k}": record["validation"]["lora"][str(k)][m] for m in METRICS})
                row[f"judge@{k}"] = judge_accuracy(teacher, lora, k, scorer)
            rows.append(row)
            print(json.dumps(row), flush=True)
    trained = rows[1:]
    return rows, {f"{m}@{k}": spearman([r[f"{m}@{k}"] for r in trained], [r[f"judge@{k}"] for r in trained])
                  for k in steps for m in METRICS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a training output folder with validations")
    parser.add_argument("--steps", nargs="+", type=int, default=[4], help="step counts to judge and correlate")
    parser.add_argument("--json", type=Path, default=None, help="also write the table and correlations here")
    args = parser.parse_args(argv)

    rows, correlations = correlate(args.run, args.steps)
    print("\n| step | " + " | ".join(f"{m}@{k}" for k in args.steps for m in (*METRICS, "judge")) + " |")
    print("|---" * (1 + 4 * len(args.steps)) + "|")
    for r in rows:
        cells = [f"{r[f'{m}@{k}']:.4g}" if m != "judge" else f"{100 * r[f'judge@{k}']:.1f}%"
                 for k in args.steps for m in (*METRICS, "judge")]
        print(f"| {r['step']} | " + " | ".join(cells) + " |")
    print(f"\nSpearman rank correlation with the judge's prompt accuracy over the run's {len(rows) - 1} validated steps "
          "(latent MSE: lower is better, so a good metric correlates negatively):")
    for name, rho in correlations.items():
        print(f"  {name}: {rho:+.3f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "spearman": correlations}, indent=2) + "\n")


if __name__ == "__main__":
    main()
