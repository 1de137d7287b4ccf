"""The model card, README.md, written beside every exported LoRA: what the Hub shows and what a user acts on.

`render_card(facts)` is pure (CardFacts -> markdown); `card_facts` gathers the facts from an export and `write_card`
writes the file. The front matter is the Hub's model card metadata (huggingface_hub `ModelCardData`: base_model,
library_name, license, tags, inference; https://huggingface.co/docs/hub/model-cards), filled as diffusers'
`load_or_create_model_card` / `populate_model_card` fill it for its LoRA training scripts (library_name diffusers;
tags text-to-image, diffusers, lora, stable-diffusion or stable-diffusion-xl), plus the tags lcm and lcm-lora. The body
says what the LoRA is, how it was trained, and how to sample with it in diffusers (LCMScheduler on the run's grid),
ComfyUI and A1111 / Forge.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import samplers
from .export import DIFFUSERS_WEIGHT_NAME, PEFT_WEIGHT_NAME, ExportInfo
from .families import FAMILY_NAMES, SDXL_FAMILY, model_family
from .model_ref import is_single_file, looks_like_hub_id
from .world import assets

CARD_NAME = "README.md"
# The line that marks a card as this toolkit's: a run replaces its own card, never a README.md someone else wrote.
MARKER = "<!-- lcm-lora model card:"
# The license of each family's reference model (the model cards of stable-diffusion-v1-5, stable-diffusion-2-1,
# stable-diffusion-xl-base-1.0, segmind/SSD-1B and segmind/Segmind-Vega): the base model's license governs a LoRA.
FAMILY_LICENSES = {"sd1": "creativeml-openrail-m", "sd2": "openrail++", "sdxl": "openrail++", "ssd-1b": "apache-2.0",
                   "vega": "apache-2.0"}
# Flags whose value may be a local path: the card shows only its last part (sd-scripts' ss_sd_model_name does the
# same), since a card is made to be published.
PATH_FLAGS = ("pretrained_teacher_model", "single_file_config", "pretrained_vae_model_name_or_path", "train_data_dir",
              "dataset_name", "train_shards_path_or_url", "encodings_dir", "output_dir", "resume_from_checkpoint",
              "logging_dir")
DEFAULT_PROMPT = "a photo of a cat"
GRID_STEPS = 4  # the validation grid shown: the step count LCM-LoRA is usually sampled with
PREDICTIONS = {"epsilon": "epsilon-prediction", "v_prediction": "v-prediction", "sample": "x0-prediction"}


@dataclass(frozen=True)
class CardFacts:
    """Everything the card says, gathered by `card_facts`."""

    title: str  # the output name
    teacher: str  # as a reader may see it: a hub id, a bundled name, or a local path's last part
    base_model: str | None  # the teacher's hub id; None for a local teacher (the Hub refuses a path there)
    single_file: bool  # the teacher is one checkpoint file, loaded with from_single_file
    family: str  # families.FAMILIES
    prediction_type: str
    steps: int | None  # optimizer steps trained; None when unknown
    license: str
    lora: str  # what load_lora_weights takes: the Hub repo id (owner/name), else the folder's name
    files: tuple[str, ...]  # the LoRA files, relative to the card
    scheduler: dict = field(default_factory=dict)  # lcm: LCMScheduler arguments that differ from its defaults; else
    # every from_config argument of the method's scheduler (samplers.Sampler.settings)
    method: str = "lcm"  # --method: which stock scheduler samples it (samplers.SCHEDULERS)
    eta: float = 0.0  # the pipeline's eta (TCD's gamma)
    inference_steps: int | None = None  # the step count it is made for (pcm: its phases)
    config: dict = field(default_factory=dict)  # the run's flat config, local paths cut; {} for a LoRA from elsewhere
    image: str | None = None  # a validation grid, relative to the card
    image_step: int | None = None


def render_card(f: CardFacts) -> str:
    """The card as markdown: front matter, then what it is, an image, usage, files and training."""
    sections = [_front_matter(f), f"{MARKER} lcm-lora writes this file at each export of its run; keep your own "
                "notes in another file. -->", _intro(f)]
    if f.image:
        sections.append(_image(f))
    sections += [_usage(f), _files(f), _training(f)]
    return "\n\n".join(s.strip("\n") for s in sections) + "\n"


def _front_matter(f: CardFacts) -> str:
    meta = {"base_model": f.base_model} if f.base_model else {}
    meta.update({
        "library_name": "diffusers",
        "license": f.license,
        "tags": ["lora", "lcm", "lcm-lora", *([f.method] if f.method != "lcm" else []), "text-to-image",
                 "stable-diffusion-xl" if f.family in SDXL_FAMILY else "stable-diffusion", "diffusers"],
        "inference": False,  # the Hub's widget would sample with the base model's scheduler, not LCMScheduler
    })
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---"


def _intro(f: CardFacts) -> str:
    trained = f" for {f.steps} optimizer steps" if f.steps is not None else ""
    how = (f"distilled with lcm-lora by latent consistency distillation ([LCM-LoRA](https://arxiv.org/abs/2311.05556))"
           f"{trained}" if f.config else "exported by lcm-lora (its file does not record how it was trained)")
    kind = PREDICTIONS.get(f.prediction_type, f.prediction_type)
    made_for = {
        "lcm": "It is made for `LCMScheduler` at 2-8 steps (4 is a good start)",
        "tcd": (f"Its jumps end at earlier times on the trajectory (`--method tcd`, [TCD](https://arxiv.org/abs/2402.19159)): "
                f"it is made for `TCDScheduler` at 2-8 steps with gamma (the pipeline's `eta`) {f.eta:g}"),
        "pcm": (f"Its jumps end at the edges of {f.inference_steps} phases (`--method pcm`, "
                "[PCM](https://arxiv.org/abs/2405.18407)): it is made for `DDIMScheduler` with trailing timesteps at "
                f"{f.inference_steps} steps"),
    }[f.method]
    return (f"# {f.title}\n\nAn LCM-LoRA for `{f.teacher}` ({FAMILY_NAMES[f.family]}, {kind}), {how}. {made_for} "
            "and guidance_scale 1 to 2: the teacher's classifier-free guidance is distilled into it.")


def _image(f: CardFacts) -> str:
    prompts = f.config.get("validation_prompts") or []
    said = f"; prompts: {', '.join(f'*{p}*' for p in prompts)}" if prompts else ""
    return (f"![Validation images]({f.image})\n\n"
            f"Validation at step {f.image_step}: {GRID_STEPS} steps of its scheduler, guidance_scale 1.0, one image per "
            f"prompt{said}.")


def _usage(f: CardFacts) -> str:
    pipeline = "StableDiffusionXLPipeline" if f.family in SDXL_FAMILY else "StableDiffusionPipeline"
    load = "from_single_file" if f.single_file else "from_pretrained"
    base = f.base_model or f.teacher
    scheduler = "".join(f", {k}={v!r}" for k, v in f.scheduler.items())
    name = samplers.SCHEDULERS[f.method]
    steps = f.inference_steps or 4
    eta = f", eta={f.eta:g}" if f.eta else ""
    where = "" if "/" in f.lora else "  # this folder, or its Hub repo id (owner/name) once uploaded"
    prompt = (f.config.get("validation_prompts") or [DEFAULT_PROMPT])[0]
    code = f"""```python
import torch
from diffusers import {name}, {pipeline}

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32
pipe = {pipeline}.{load}({_py(base)}, torch_dtype=dtype)
pipe.scheduler = {name}.from_config(pipe.scheduler.config{scheduler})
pipe.load_lora_weights({_py(f.lora)}{_weight_args(f.files)}){where}
pipe.to(device)
image = pipe({_py(prompt)}, num_inference_steps={steps}, guidance_scale=1.0{eta}).images[0]
image.save("lcm-lora.png")
```"""
    notes = ["`guidance_scale` 1.0 turns classifier-free guidance off; 1-2 is the useful range."]
    if f.scheduler and f.method == "lcm":
        settings = ", ".join(f"`{k}={v!r}`" for k, v in f.scheduler.items())
        notes.append(f"It was distilled on another grid than LCMScheduler's defaults: {settings} puts the few steps on "
                     "the timesteps it learned.")
    if not f.base_model:
        notes.append(f"`{base}` is the local model it was distilled from: give its path, or the Hub id of the model it "
                     "is a copy of.")
    return "## Use it with diffusers\n\n" + code + "\n\n" + " ".join(notes)


def _weight_args(files: tuple[str, ...]) -> str:
    """load_lora_weights' arguments naming the file: a repo or folder may hold several LoRA files."""
    if DIFFUSERS_WEIGHT_NAME in files:
        return f", weight_name={_py(DIFFUSERS_WEIGHT_NAME)}"
    top = [name for name in files if "/" not in name]
    if top:
        return f", weight_name={_py(top[0])}"
    folder, name = PEFT_WEIGHT_NAME.rsplit("/", 1)
    return f", subfolder={_py(folder)}, weight_name={_py(name)}"


def _files(f: CardFacts) -> str:
    uses = {
        DIFFUSERS_WEIGHT_NAME: ("kohya (`lora_unet_*`)", "diffusers (`load_lora_weights`), ComfyUI (`models/loras`), "
                                "A1111 / Forge (`models/Lora`), InvokeAI"),
        PEFT_WEIGHT_NAME: ("PEFT (`unet.*.lora_A/B`)", "diffusers only"),
    }
    kohya = ("kohya (`lora_unet_*`)", "the same file under a name a UI lists: ComfyUI (`models/loras`), "
             "A1111 / Forge (`models/Lora`)")
    rows = [f"| `{name}` | {' | '.join(uses.get(name, kohya))} |" for name in f.files]
    stem = Path(next((n for n in f.files if "/" not in n and n != DIFFUSERS_WEIGHT_NAME), DIFFUSERS_WEIGHT_NAME)).stem
    comfy, comfy_scheduler, a1111 = samplers.UI_SAMPLERS[f.method]
    steps = f"{f.inference_steps} steps" if f.inference_steps else "4-8 steps"
    ui = (f"In ComfyUI, load it with a LoRA loader node and sample with sampler `{comfy}`, scheduler "
          f"`{comfy_scheduler}`; in A1111 / Forge, put `<lora:{stem}:1>` in the prompt and pick the sampler `{a1111}`. "
          f"Both: {steps}, CFG 1-2.")
    if f.method == "tcd":
        ui += (" Neither has TCD's sampler in its core (ComfyUI has it as a custom node); Euler a is the nearest, "
               "and LCM's sampler, which is TCD's at gamma 1, also works.")
    if f.scheduler and f.method == "lcm":
        ui += (" Their LCM samplers have no setting for the grid above; diffusers samples this LoRA exactly as "
               "trained.")
    return "## Files\n\n| File | Keys | Loads in |\n|---|---|---|\n" + "\n".join(rows) + "\n\n" + ui


def _training(f: CardFacts) -> str:
    c = f.config
    if not c:
        return "## Training\n\nNot recorded in the file this LoRA was exported from."
    rows = [("Teacher", f"`{f.teacher}`"), ("Method", f"`{c.get('method', 'lcm')}`" + (
        f", {c.get('multiphase')} phases" if c.get("method") == "pcm" else ""))]
    if f.steps is not None:
        rows.append(("Optimizer steps", str(f.steps)))
    if "lora_rank" in c:
        rank, alpha = c["lora_rank"], c.get("lora_alpha", c["lora_rank"])
        rows.append(("LoRA", f"rank {rank}, alpha {alpha:g} (update scaled by alpha / rank = {alpha / rank:g})"))
    if "w_min" in c:
        rows.append(("Guidance w", f"U[{c['w_min']:g}, {c['w_max']:g}], the LCM paper's w (diffusers' guidance_scale "
                                   f"{c['w_min'] + 1:g}-{c['w_max'] + 1:g}), distilled into the LoRA"))
    if "num_ddim_timesteps" in c:
        rows.append(("DDIM solver grid N", f"{c['num_ddim_timesteps']} (LCMScheduler's original_inference_steps)"))
    if "timestep_scaling_factor" in c:
        rows.append(("Timestep scaling s", f"{c['timestep_scaling_factor']:g} (LCMScheduler's timestep_scaling)"))
    if "loss_type" in c:
        rows.append(("Loss", {"huber": f"pseudo-Huber per element, c = {c.get('huber_c')}",
                              "huber_sample": f"pseudo-Huber per example (iCT), c = {c.get('huber_c')}"}.get(
                                  c["loss_type"], "L2")))
    if "ema_decay" in c:
        rows.append(("Target network", f"EMA of the LoRA, decay {c['ema_decay']:g}" if c["ema_decay"] else
                     "the student itself (no EMA), as LCM-LoRA"))
    if "learning_rate" in c:
        rows.append(("Optimizer", f"AdamW, learning rate {c['learning_rate']:g}, {c.get('lr_scheduler')} schedule, "
                                  f"{c.get('lr_warmup_steps')} warmup steps"))
    if "train_batch_size" in c:
        rows.append(("Batch", f"{c['train_batch_size']} per device x {c.get('gradient_accumulation_steps', 1)} "
                              "accumulation steps"))
    if "resolution" in c:
        rows.append(("Resolution", f"{c['resolution']} px"))
    if "mixed_precision" in c:
        rows.append(("Mixed precision", str(c["mixed_precision"])))
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    full = yaml.safe_dump(c, sort_keys=False, allow_unicode=True)
    return (f"## Training\n\n{table}\n\n<details>\n<summary>Every flag of the run (local paths cut to their last "
            f"part)</summary>\n\n```yaml\n{full}```\n\n</details>")


def _py(text: str) -> str:
    """A Python string literal (JSON's double-quoted form is one)."""
    return json.dumps(text, ensure_ascii=False)


# -- the edge: facts from an export, the file ---------------------------------------------------------------------

def public_value(value):
    """A local path as its last part; a hub id, a bundled name or anything else unchanged."""
    if not isinstance(value, str) or value in assets.BUNDLED_FILES or looks_like_hub_id(value):
        return value
    if os.path.isabs(value) or value.startswith(("~", ".")) or os.sep in value or Path(value).exists():
        return Path(value).name
    return value


def public_config(config_flat: dict) -> dict:
    return {k: public_value(v) if k in PATH_FLAGS else v for k, v in config_flat.items()}


def scheduler_changes(sampler: samplers.Sampler) -> dict:
    """The arguments the card's snippet passes to the LoRA's scheduler: for LCMScheduler those of the run's grid that
    differ from its own defaults, for the others all of them (trailing timesteps, no clipping...)."""
    if sampler.method != "lcm":
        return sampler.settings
    from diffusers import LCMScheduler

    defaults = inspect.signature(LCMScheduler.__init__).parameters
    return {k: v for k, v in sampler.settings.items() if v != defaults[k].default}


def validation_grid(run_dir: str | Path, up_to_step: int | None = None) -> tuple[Path, int] | None:
    """(grid, step) of the run's last validation at or before `up_to_step`: validation/step-N/<k>-steps.png, k = 4
    when drawn, else the k nearest it; None when the run drew none."""
    found = []
    for folder in Path(run_dir, "validation").glob("step-*"):
        step = int(folder.name[5:]) if re.fullmatch(r"step-\d+", folder.name) else None
        grids = {int(p.name.split("-")[0]): p for p in folder.glob("*-steps.png") if p.name.split("-")[0].isdigit()}
        if step is not None and grids and (up_to_step is None or step <= up_to_step):
            found.append((step, grids[min(grids, key=lambda k: (abs(k - GRID_STEPS), k))]))
    if not found:
        return None
    step, grid = max(found)
    return grid, step


def card_facts(info: ExportInfo, out_dir: str | Path, files: list[Path], license: str | None = None,
               repo_id: str | None = None, image: Path | None = None, image_step: int | None = None) -> CardFacts:
    """The facts of an export into `out_dir` whose LoRA `files` were just written."""
    out_dir = Path(out_dir)
    family = model_family(info.unet_config)
    teacher = str(info.teacher)
    sampler = samplers.for_config(info.config_flat)
    return CardFacts(
        title=info.output_name, teacher=public_value(teacher),
        base_model=teacher if looks_like_hub_id(teacher) else None, single_file=is_single_file(teacher),
        family=family, prediction_type=info.prediction_type, steps=info.steps,
        license=license or info.config_flat.get("license") or FAMILY_LICENSES[family],
        lora=repo_id or out_dir.resolve().name, files=tuple(Path(p).relative_to(out_dir).as_posix() for p in files),
        scheduler=scheduler_changes(sampler),
        method=sampler.method, eta=sampler.eta, inference_steps=sampler.steps, config=public_config(info.config_flat),
        image=Path(image).relative_to(out_dir).as_posix() if image else None, image_step=image_step)


def is_own_card(path: str | Path) -> bool:
    """True for a README.md this toolkit wrote (it carries MARKER)."""
    try:
        return MARKER in Path(path).read_text(errors="replace")
    except OSError:
        return False


def write_card(out_dir: str | Path, facts: CardFacts) -> Path:
    """README.md in `out_dir`, written under a temporary name and renamed, so a reader never sees half a card."""
    path = Path(out_dir) / CARD_NAME
    tmp = path.with_name(f".{CARD_NAME}.tmp-{os.getpid()}")
    try:
        tmp.write_text(render_card(facts))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
