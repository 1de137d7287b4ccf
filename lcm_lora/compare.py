"""`lcm-lora compare`: any base model, with or without an LCM-LoRA, against its own many-step samples.

For each prompt the teacher's reference (guided DDIM, many steps) is drawn from the prompt's seed; then, from the same
seed, the plain model under DDIM at each step count and teacher guidance, and the LoRA under its own scheduler (lcm_lora.samplers) at each step
count and guidance. Each sample gets the agreement metrics of lcm_lora.agreement and each sampler its seconds per
image. Written to the output folder: sheet-<k>-steps.png (a row per prompt, a column per sampler), compare.json and
compare.html (one page, the sheets inlined).
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import agreement
from .export import lora_file
from .inference import load_base_pipeline, place, use_lcm_lora
from .safetensors_io import read_metadata

DEFAULT_GUIDANCE = 7.5  # diffusers' pipelines' default guidance_scale


@dataclass(frozen=True)
class Sampler:
    kind: str  # "teacher" (DDIM, trailing) or "lora" (its own scheduler)
    steps: int
    guidance_scale: float

    @property
    def label(self) -> str:
        name = "teacher" if self.kind == "teacher" else "LoRA"
        return f"{name} {self.steps} cfg {self.guidance_scale:g}"


def lora_reference_guidance(lora: str | Path | None) -> float | None:
    """The guidance a LoRA of ours was trained to reproduce, from its recorded w range; None for other LoRAs."""
    if lora is None:
        return None
    path = lora_file(lora)
    w_range = read_metadata(path).get("lcm_lora.w_range") if path.is_file() else None
    try:
        w_min, w_max = (float(w) for w in w_range.split(","))
    except (AttributeError, ValueError):
        return None
    return agreement.reference_guidance(w_min, w_max)


def timed(device: str, fn):
    """(fn(), seconds), the device synchronized on both sides so that queued GPU work is counted."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    started = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - started


def compare(pretrained_model: str, lora: str | None, prompts: list[str], seed: int, steps: list[int],
            guidance_scales: list[float], teacher_guidance_scales: list[float] | None, reference_steps: int,
            reference_guidance: float | None, size: tuple[int, int] | None, device: str, dtype: torch.dtype,
            single_file_config: str | None = None, lcm_settings: dict | None = None, fuse_lora: bool = False) -> dict:
    """Every sampler's numbers and pictures, as `write` saves them: {"summary": a JSON-ready dict, "sheets": {k: image}}."""
    reference_guidance = reference_guidance or lora_reference_guidance(lora) or DEFAULT_GUIDANCE
    pipe = place(load_base_pipeline(pretrained_model, single_file_config), device, dtype)
    pipe.set_progress_bar_config(disable=True)
    size = size or (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2
    seeds = [seed + i for i in range(len(prompts))]
    samplers = [Sampler("teacher", k, g) for k in steps for g in (teacher_guidance_scales or [reference_guidance])]
    ddim = agreement.ddim_trailing(pipe)

    warmed = set()

    def draw(scheduler, k: int, g: float, eta: float = 0.0):
        if (id(scheduler), g > 1) not in warmed:  # one-time costs (kernels, caches) are not timed
            agreement.sample(pipe, scheduler, prompts[:1], seeds[:1], size, 1, g, eta)
            warmed.add((id(scheduler), g > 1))
        latents, seconds = timed(device, lambda: agreement.sample(pipe, scheduler, prompts, seeds, size, k, g, eta))
        images, decode_seconds = timed(device, lambda: agreement.decode(pipe, latents))
        return latents, images, (seconds + decode_seconds) / len(prompts)

    ref_latents, ref_images, ref_seconds = draw(ddim, reference_steps, reference_guidance)
    drawn = {s: draw(ddim, s.steps, s.guidance_scale) for s in samplers}
    lora_scheduler = None
    if lora is not None:
        eta = use_lcm_lora(pipe, lora, **(lcm_settings or {})).eta
        if fuse_lora:  # the LoRA merged into the weights: no extra work per layer
            pipe.fuse_lora()
        place(pipe, device, dtype)
        lcm = pipe.scheduler
        lora_scheduler = type(lcm).__name__
        for k in steps:
            for g in guidance_scales:
                drawn[Sampler("lora", k, g)] = draw(lcm, k, g, eta)
    rows = []
    for sampler, (latents, images, seconds) in drawn.items():
        per_prompt = agreement.scores(latents, images, ref_latents, ref_images)
        rows.append({"sampler": sampler.kind, "scheduler": "DDIM trailing" if sampler.kind == "teacher" else
                     lora_scheduler, "steps": sampler.steps, "guidance_scale": sampler.guidance_scale,
                     **agreement.mean_scores(per_prompt), "seconds_per_image": round(seconds, 4),
                     "per_prompt": per_prompt})
    summary = {"pretrained_model": pretrained_model, "lora": str(lora) if lora else None, "fused": fuse_lora,
               "prompts": prompts, "seeds": seeds, "height": size[0], "width": size[1], "device": device,
               "dtype": str(dtype),
               "reference": {"scheduler": "DDIM trailing", "steps": reference_steps,
                             "guidance_scale": reference_guidance, "seconds_per_image": round(ref_seconds, 4)},
               "results": rows}
    pictures = {"ref": agreement.to_pil(ref_images), **{s: agreement.to_pil(d[1]) for s, d in drawn.items()}}
    sheets = {k: agreement.sheet({f"teacher {reference_steps} cfg {reference_guidance:g}": pictures["ref"],
                                  **{s.label: pictures[s] for s in drawn if s.steps == k}}) for k in steps}
    return {"summary": summary, "sheets": sheets}


def output_paths(output_dir: str | Path, steps: list[int]) -> list[Path]:
    out = Path(output_dir)
    return [out / f"sheet-{k}-steps.png" for k in steps] + [out / "compare.json", out / "compare.html"]


def write(result: dict, output_dir: str | Path) -> list[Path]:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k, image in result["sheets"].items():
        image.save(out / f"sheet-{k}-steps.png")
        written.append(out / f"sheet-{k}-steps.png")
    (out / "compare.json").write_text(json.dumps(result["summary"], indent=2) + "\n")
    (out / "compare.html").write_text(page(result["summary"], result["sheets"]))
    return written + [out / "compare.json", out / "compare.html"]


def table(summary: dict) -> str:
    """The results as a Markdown table (also the command's printout)."""
    ref = summary["reference"]
    lines = [f"against the teacher's {ref['steps']} DDIM steps at guidance {ref['guidance_scale']:g} "
             f"({ref['seconds_per_image']:.3g} s/image)", "",
             "| sampler | steps | guidance | PSNR dB | SSIM | latent MSE | s/image |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary["results"]:
        lines.append(f"| {r['sampler']} ({r['scheduler']}) | {r['steps']} | {r['guidance_scale']:g} | {r['psnr']:.2f} "
                     f"| {r['ssim']:.3f} | {r['latent_mse']:.4f} | {r['seconds_per_image']:.3g} |")
    return "\n".join(lines)


def page(summary: dict, sheets: dict) -> str:
    """A self-contained HTML page: the settings, the table and the sheets as inline PNGs."""
    ref = summary["reference"]
    head = ["sampler", "steps", "guidance", "PSNR dB", "SSIM", "latent MSE", "s/image"]
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            f"{r['sampler']} ({r['scheduler']})", r["steps"], f"{r['guidance_scale']:g}", f"{r['psnr']:.2f}",
            f"{r['ssim']:.3f}", f"{r['latent_mse']:.4f}", f"{r['seconds_per_image']:.3g}")) + "</tr>"
        for r in summary["results"])
    figures = "".join(f"<h2>{k} steps</h2><img alt='{k} steps' src='data:image/png;base64,{_png64(img)}'>"
                      for k, img in sheets.items())
    prompts = "".join(f"<li>{html.escape(p)} (seed {s})</li>" for p, s in zip(summary["prompts"], summary["seeds"]))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>lcm-lora compare</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:3px 8px;text-align:right}}img{{image-rendering:pixelated;max-width:100%}}</style></head><body>
<h1>{html.escape(summary["pretrained_model"])}{" + " + html.escape(summary["lora"]) if summary["lora"] else ""}</h1>
<p>Agreement with the model's own {ref["steps"]}-step DDIM sample at guidance {ref["guidance_scale"]:g}, from the same
seed: PSNR and SSIM of the images, MSE of the latents ({summary["height"]}x{summary["width"]}, {summary["device"]},
{summary["dtype"]}). Rows of each sheet are the prompts:</p><ol start="0">{prompts}</ol>
<table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>{rows}</table>{figures}</body></html>
"""


def _png64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
