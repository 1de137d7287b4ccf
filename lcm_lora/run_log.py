"""A run's numbers as it trains: `metrics.jsonl` in its output folder, one JSON object per line.

    {"step": 12, "loss": 0.0123, "lr": 0.001}                                   every optimizer step
    {"step": 200, "validation": {"lora": {"4": {"psnr": 24.1, ...}}, "teacher": {...}, ...}}   each validation

The best step, the plots at the end of a run, and `lcm-lora export --from_checkpoint best` all read this file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .agreement import HIGHER_IS_BETTER

LOG_NAME = "metrics.jsonl"
PLOTS_DIR = "plots"
BEST_STEPS = 4  # the step count "best" is judged at: LCM-LoRA's recommended 4 (arXiv 2311.05556, sec. 4)
BEST_METRIC = "psnr"
METRIC_LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "latent_mse": "latent MSE"}


def validation_dir(run_dir: str | Path, step: int) -> Path:
    """Where the validation at `step` keeps its LoRA, images and sheets."""
    return Path(run_dir) / "validation" / f"step-{step}"


class MetricsLog:
    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOG_NAME

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        """Every complete line; a last line cut short by a kill is left out."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def keep_up_to(self, step: int) -> None:
        """Drop the records after `step`: on resume from checkpoint-`step`, the steps after it are trained again."""
        records = self.records()
        kept = [r for r in records if r.get("step", 0) <= step]
        if len(kept) == len(records) and self.path.is_file() and self.path.read_text().endswith("\n"):
            return
        tmp = self.path.with_name(f".{LOG_NAME}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def validations(self) -> list[dict]:
        return [r for r in self.records() if "validation" in r]


def judged_steps(validation: dict) -> str | None:
    """The LoRA step count "best" is judged at in a validation record: 4 when drawn, else the nearest."""
    drawn = [int(k) for k in validation.get("lora", {})]
    return str(min(drawn, key=lambda k: (abs(k - BEST_STEPS), k))) if drawn else None


def best_validation(records: list[dict], steps_allowed: set[int] | None = None) -> dict | None:
    """The validation record with the best mean BEST_METRIC at BEST_STEPS (ties: the earlier step), among
    `steps_allowed` when given."""
    best, best_value = None, None
    sign = 1 if HIGHER_IS_BETTER[BEST_METRIC] else -1
    for record in records:
        v = record.get("validation", {})
        k = judged_steps(v)
        if k is None or (steps_allowed is not None and record["step"] not in steps_allowed):
            continue
        value = sign * v["lora"][k][BEST_METRIC]
        if best_value is None or value > best_value:
            best, best_value = record, value
    return best


def best_summary(record: dict) -> str:
    v = record["validation"]
    k = judged_steps(v)
    lora, teacher = v["lora"][k][BEST_METRIC], v["teacher"][k][BEST_METRIC]
    return (f"best agreement with the teacher at {k} steps: step {record['step']} ({BEST_METRIC} {lora:.4g} for the "
            f"LoRA against {teacher:.4g} for the teacher's own {k} DDIM steps)")


def write_plots(run_dir: str | Path) -> list[Path] | str:
    """loss.png and one PNG per agreement metric (LoRA at each k, solid; the teacher at k, dashed) in plots/; a
    message instead when matplotlib is not installed or there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plots skipped: matplotlib is not installed (pip install 'lcm-lora[plots]')"
    records = MetricsLog(run_dir).records()
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    validations = [r for r in records if "validation" in r]
    if not losses and not validations:
        return f"plots skipped: {Path(run_dir) / LOG_NAME} holds no numbers"
    out = Path(run_dir) / PLOTS_DIR
    out.mkdir(exist_ok=True)
    written = []
    if losses:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps, values = zip(*losses)
        window = max(1, len(values) // 50)  # a running mean shows the trend through the per-batch noise
        ax.plot(steps, values, lw=0.5, alpha=0.35, color="C0")
        ax.plot(steps[window - 1:], np.convolve(values, np.ones(window) / window, "valid"), color="C0",
                label=f"mean of {window} steps")
        ax.legend(fontsize=7)
        ax.set(xlabel="step", ylabel="loss", yscale="log", title="consistency distillation loss")
        written.append(_save(fig, out / "loss.png"))
    for metric in HIGHER_IS_BETTER if validations else ():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for i, k in enumerate(sorted(validations[-1]["validation"]["lora"], key=int)):
            points = [(r["step"], r["validation"]["lora"][k][metric]) for r in validations
                      if k in r["validation"]["lora"]]
            color = f"C{i}"
            steps = f"{k} step" + "s" * (k != "1")
            ax.plot(*zip(*points), marker="o", ms=3, color=color, label=f"LoRA, {steps}")
            teacher = validations[-1]["validation"]["teacher"].get(k)
            if teacher is not None:
                ax.axhline(teacher[metric], color=color, ls="--", lw=0.8, label=f"teacher DDIM, {steps}")
        ref = validations[-1]["validation"]["reference"]
        better = "higher" if HIGHER_IS_BETTER[metric] else "lower"
        ax.set(xlabel="step", ylabel=METRIC_LABELS[metric], title=f"against the teacher's {ref['steps']} steps, "
               f"guidance {ref['guidance_scale']:g} ({better} is better)")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / f"{metric}.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def select_checkpoint(run_dir: str | Path, which: str) -> tuple[Path, str]:
    """(what to export, what it is) for `--from_checkpoint` in a run folder: `best` (the best validated step: its
    checkpoint-N, else the LoRA its validation exported), `latest`, or a step N."""
    from .checkpoint import checkpoint_step, checkpoints
    from .export import DIFFUSERS_WEIGHT_NAME

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--checkpoint {run_dir}: no such folder; --from_checkpoint picks a checkpoint in a "
                                "training output folder.")
    saved = {checkpoint_step(p): p for p in checkpoints(run_dir)}
    if which == "best":
        validations = MetricsLog(run_dir).validations()
        lora_files = {r["step"]: validation_dir(run_dir, r["step"]) / DIFFUSERS_WEIGHT_NAME for r in validations}
        available = set(saved) | {step for step, path in lora_files.items() if path.is_file()}
        best = best_validation(validations, available)
        if best is None:
            raise FileNotFoundError(f"--from_checkpoint best: {run_dir / LOG_NAME} has no validation of a step whose "
                                    "LoRA is still there. Train with --validation_steps and --validation_prompts, or "
                                    "name a step (--from_checkpoint N) or latest.")
        step = best["step"]
        return saved.get(step, lora_files.get(step)), best_summary(best)
    if which == "latest":
        if not saved:
            raise FileNotFoundError(f"--from_checkpoint latest: {run_dir} holds no checkpoint-N folder.")
        step = max(saved)
        return saved[step], f"the latest checkpoint, step {step}"
    if not which.isdigit():
        raise ValueError(f"--from_checkpoint {which}: give best, latest or a step number.")
    if int(which) not in saved:
        raise FileNotFoundError(f"--from_checkpoint {which}: {run_dir} has no checkpoint-{which} (it has: "
                                f"{', '.join(p.name for p in saved.values()) or 'none'}).")
    return saved[int(which)], f"checkpoint-{which}"
