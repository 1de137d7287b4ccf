"""Load a Stable Diffusion teacher and put a PEFT LoRA on its UNet.

One UNet serves as student (adapter on), teacher (adapter off) and target (adapter on, no grad),
so a run holds one UNet in memory, not two. Weights load from safetensors only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .config import PREDICTION_TYPES, ConfigError, LoraArgs, ModelArgs
from .families import SDXL_FAMILY, model_family, refiner_problem
from .model_ref import ModelRef, resolve_model
from .world import assets


@dataclass
class Teacher:
    tokenizer: CLIPTokenizer | None  # None (with text_encoder and vae) when training from cached encodings
    text_encoder: CLIPTextModel | None
    vae: AutoencoderKL | None
    unet: UNet2DConditionModel | None  # None when only the encoders are needed (writing a cache)
    noise_scheduler: DDPMScheduler  # only its alphas_cumprod table is used
    prediction_type: str
    source: str
    tokenizer_2: CLIPTokenizer | None = None  # the SDXL family's second encoder (OpenCLIP bigG), with projection
    text_encoder_2: CLIPTextModelWithProjection | None = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: the pipeline's uncond is zeros, not the encoded ""

    @property
    def tokenizers(self) -> tuple:
        return tuple(t for t in (self.tokenizer, self.tokenizer_2) if t is not None)

    @property
    def text_encoders(self) -> tuple:
        return tuple(t for t in (self.text_encoder, self.text_encoder_2) if t is not None)


def resolve_teacher(name_or_path: str) -> str:
    """A bundled tiny model's name as its folder or file; anything else unchanged (see model_ref for the checks)."""
    if name_or_path in assets.BUNDLED:
        return str(assets.resolve(name_or_path))
    return name_or_path


def model_ref(args: ModelArgs) -> ModelRef:
    """The teacher's ModelRef (where its weights and its config files are), or a ConfigError naming the flag."""
    return resolve_model(args.pretrained_teacher_model, args.single_file_config, args.revision)


def config_source(args: ModelArgs) -> str:
    """The local folder of the teacher's config files: its own folder, the cache's copy of a hub repo's configs, or
    the --single_file_config folder of a single file."""
    return model_ref(args).configs


def unet_config(args: ModelArgs) -> dict:
    """The teacher UNet's config, read from config files only."""
    return load_unet_config(config_source(args), args.revision, f"--pretrained_teacher_model {args.pretrained_teacher_model}")


def load_unet_config(source: str, revision: str | None = None, flag: str = "") -> dict:
    try:
        return dict(UNet2DConditionModel.load_config(source, subfolder="unet", revision=revision))
    except OSError as err:
        raise ConfigError(f"{flag or source}: cannot read a UNet config from {source} ({err}).") from None


def unet_module_paths(unet_config: dict) -> dict[str, torch.Size]:
    """Every Linear / Conv2d path of a UNet with this config and its weight's shape, built on the meta device
    (no memory, no weights): what a LoRA may target."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
    return {name: m.weight.shape for name, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def load_teacher(args: ModelArgs, encoders: bool = True, unet: bool = True) -> Teacher:
    """The teacher's parts from a hub id, a folder or a single file; `encoders` / `unet` False leave those out."""
    ref = model_ref(args)
    if ref.single_file:
        return _load_single_file_teacher(args, encoders, unet)
    source = ref.location
    if Path(source).exists() and not (Path(source) / "unet").is_dir():
        raise FileNotFoundError(
            f"--pretrained_teacher_model {source}: no 'unet' subfolder. Give a diffusers pipeline folder "
            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."
        )
    # use_safetensors=True: diffusers and transformers refuse pickle weights instead of falling back to them.
    common = dict(revision=args.revision, use_safetensors=None if args.allow_pickle_weights else True)
    noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", revision=args.revision)
    prediction_type = _prediction_type(args, noise_scheduler.config, source)
    parts, sdxl = {}, is_sdxl(load_unet_config(source, args.revision))
    try:
        if encoders:
            parts["tokenizer"] = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=args.revision)
            parts["text_encoder"] = CLIPTextModel.from_pretrained(source, subfolder="text_encoder",
                                                                  variant=args.variant, **common)
            if sdxl:
                parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2",
                                                                     revision=args.revision)
                parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                    source, subfolder="text_encoder_2", variant=args.variant, **common)
            parts["vae"] = _load_vae(args, source, common)
        unet_model = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=args.variant,
                                                          **common) if unet else None
    except OSError as err:
        if args.allow_pickle_weights or not _has_pickle_weights(source):
            raise
        raise ConfigError(f"--pretrained_teacher_model {args.pretrained_teacher_model}: it has pickle weights "
                          "(.bin/.ckpt) but no .safetensors. Pickle files can run code when loaded, so they are "
                          "refused; convert them to safetensors, or pass --allow_pickle_weights if you trust "
                          "the files.") from err
    return Teacher(
        tokenizer=parts.get("tokenizer"),
        text_encoder=parts.get("text_encoder"),
        vae=parts.get("vae"),
        unet=unet_model,
        noise_scheduler=noise_scheduler,
        prediction_type=prediction_type,
        source=args.pretrained_teacher_model,
        tokenizer_2=parts.get("tokenizer_2"),
        text_encoder_2=parts.get("text_encoder_2"),
        force_zeros_for_empty_prompt=sdxl and _force_zeros(source, args.revision),
    )


def is_sdxl(unet_config: dict) -> bool:
    """The SDXL family (SDXL, SSD-1B, Vega): a UNet with text-time (size and crop) conditioning."""
    return model_family(unet_config) in SDXL_FAMILY


def _force_zeros(source: str, revision: str | None) -> bool:
    """The SDXL pipeline's `force_zeros_for_empty_prompt` (model_index.json; diffusers' default: true)."""
    from diffusers import DiffusionPipeline

    try:
        return bool(DiffusionPipeline.load_config(source, revision=revision).get("force_zeros_for_empty_prompt", True))
    except OSError:
        return True


def _load_vae(args: ModelArgs, source: str, common: dict) -> AutoencoderKL:
    """The teacher's VAE, or --pretrained_vae_model_name_or_path (a VAE folder or hub id, or a pipeline's vae/)."""
    vae_source = args.pretrained_vae_model_name_or_path
    if vae_source is None:
        return AutoencoderKL.from_pretrained(source, subfolder="vae", variant=args.variant, **common)
    return AutoencoderKL.from_pretrained(vae_source, subfolder=_vae_subfolder(vae_source), **common)


def _vae_subfolder(vae_source: str) -> str | None:
    return "vae" if (Path(vae_source) / "vae").is_dir() else None


def _load_single_file_teacher(args: ModelArgs, encoders: bool, unet: bool) -> Teacher:
    """diffusers' from_single_file builds every part; the ones not asked for are dropped at once."""
    from .single_file import load_single_file_pipeline

    pipe = load_single_file_pipeline(model_ref(args).location, args.single_file_config,
                                     allow_pickle_weights=args.allow_pickle_weights)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return Teacher(
        tokenizer=pipe.tokenizer if encoders else None,
        text_encoder=pipe.text_encoder if encoders else None,
        vae=pipe.vae if encoders else None,
        unet=pipe.unet if unet else None,
        noise_scheduler=noise_scheduler,
        prediction_type=_prediction_type(args, noise_scheduler.config, args.pretrained_teacher_model),
        source=args.pretrained_teacher_model,
        tokenizer_2=getattr(pipe, "tokenizer_2", None) if encoders else None,
        text_encoder_2=getattr(pipe, "text_encoder_2", None) if encoders else None,
        force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
    )


def teacher_prediction_type(args: ModelArgs) -> str:
    """The teacher's prediction type (--prediction_type, else its scheduler config), read without any weights."""
    config = DDPMScheduler.load_config(config_source(args), subfolder="scheduler", revision=args.revision)
    return _prediction_type(args, config, args.pretrained_teacher_model)


def _prediction_type(args: ModelArgs, scheduler_config, source: str) -> str:
    prediction_type = args.prediction_type or scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{source}: prediction type {prediction_type!r} is not one of {PREDICTION_TYPES}; "
                         "set --prediction_type.")
    return prediction_type


def _has_pickle_weights(source: str) -> bool:
    folder = Path(source)
    return folder.is_dir() and any(p.suffix in (".bin", ".ckpt", ".pt", ".pth") for p in folder.glob("*/*"))


def teacher_problems(args: ModelArgs, resolution: int, num_ddim_timesteps: int, encoders: bool = True) -> list[str]:
    """What makes the teacher unusable for this run, read from its config files before any weight loads."""
    flag = f"--pretrained_teacher_model {args.pretrained_teacher_model}"
    try:
        ref = model_ref(args)
    except ConfigError as err:
        return [str(err)]
    if ref.single_file:
        from .single_file import single_file_problems

        problems = single_file_problems(ref.location, args.single_file_config, args.allow_pickle_weights)
        if problems:
            return [f"{flag}: {p}" for p in problems]
    source = ref.configs
    if Path(source).is_dir():
        needed = ["unet", "scheduler"] + (["vae", "text_encoder", "tokenizer"] if encoders else [])
        if (Path(source) / "unet").is_dir():
            config = load_unet_config(source, args.revision, flag)
            refiner = refiner_problem(config, source)
            if refiner:
                return [f"{flag}: {refiner}"]
            needed += ["text_encoder_2", "tokenizer_2"] if encoders and is_sdxl(config) else []
        missing = [sub for sub in needed if not (Path(source) / sub).is_dir()]
        if missing:
            return [f"{flag}: no {', '.join(missing)} subfolder. Give a diffusers pipeline folder "
                    f"(model_index.json, {'/, '.join(needed)}/)."]
    problems = []
    try:
        scheduler = DDPMScheduler.load_config(source, subfolder="scheduler", revision=args.revision)
        vae = AutoencoderKL.load_config(source, subfolder="vae", revision=args.revision) if encoders else None
    except OSError as err:
        return [f"{flag}: cannot read its configs ({err})."]
    T = scheduler.get("num_train_timesteps", 1000)
    if T % num_ddim_timesteps or num_ddim_timesteps > T:
        divisors = [n for n in (50, 40, 25, 20, 10) if T % n == 0]
        problems.append(f"--num_ddim_timesteps {num_ddim_timesteps} does not divide the teacher's {T} training "
                        f"timesteps; use a divisor such as {', '.join(map(str, divisors)) or 1}.")
    prediction = args.prediction_type or scheduler.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        problems.append(f"{flag}: its scheduler's prediction type {prediction!r} is not one of {PREDICTION_TYPES}; "
                        "set --prediction_type.")
    if vae is not None:
        factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        if resolution % factor:
            below = resolution - resolution % factor
            problems.append(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor "
                            f"{factor}; use {below} or {below + factor}.")
    return problems


def lora_config(args: LoraArgs) -> LoraConfig:
    return LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=list(args.lora_target_modules),
        init_lora_weights="gaussian",  # B = 0: the student starts exactly at the teacher
    )


def attach_lora(unet: UNet2DConditionModel, args: LoraArgs) -> UNet2DConditionModel:
    """Freeze the UNet and add one trainable LoRA adapter, kept in fp32 whatever the UNet's dtype."""
    unet.requires_grad_(False)
    unet.add_adapter(lora_config(args))
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return unet


@contextlib.contextmanager
def adapter_disabled(unet: UNet2DConditionModel):
    """The teacher: the same UNet with its LoRA switched off, switched back on however we leave."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


class TargetEMA:
    """The target network theta- <- mu theta- + (1 - mu) theta over the LoRA tensors (LCM, Algorithm 1).

    A copy of the LoRA only (MBs), never of the UNet. `swapped_in` runs the UNet with theta- in place of
    theta and restores theta bit for bit; Accelerate saves it in checkpoints through state_dict.
    """

    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.names, self.params, self.decay = list(named_params), list(named_params.values()), decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for p, s in zip(self.params, self.shadow):
            s.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        live = [p.detach().clone() for p in self.params]
        for p, s in zip(self.params, self.shadow):
            p.data.copy_(s)
        try:
            yield
        finally:
            for p, v in zip(self.params, live):
                p.data.copy_(v)

    def state_dict(self) -> dict:
        return {"shadow": {n: s.clone() for n, s in zip(self.names, self.shadow)}}

    def load_state_dict(self, state: dict) -> None:
        for n, s in zip(self.names, self.shadow):
            s.copy_(state["shadow"][n])


def teacher_fingerprint(args: ModelArgs) -> dict:
    """What a cache of encodings depends on: the teacher's id or absolute folder, revision and variant,
    and a hash of its VAE and text-encoder configs (read from config files, no weights loaded)."""
    import hashlib
    import json

    from transformers import CLIPTextConfig

    source = config_source(args)
    sdxl = is_sdxl(unet_config(args))
    vae = (AutoencoderKL.load_config(source, subfolder="vae", revision=args.revision)
           if args.pretrained_vae_model_name_or_path is None else _vae_config(args.pretrained_vae_model_name_or_path))
    configs = {"vae": dict(vae)}
    for encoder in ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",):
        configs[encoder] = CLIPTextConfig.from_pretrained(source, subfolder=encoder,
                                                          revision=args.revision).to_diff_dict()
    for config in configs.values():  # bookkeeping that changes with library versions, not the model
        for key in [k for k in config if k.startswith("_") or k == "transformers_version"]:
            config.pop(key)
    digest = hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    ref = model_ref(args)
    teacher = ref.location if ref.kind == "hub" else ref.name if ref.kind == "bundled" else str(Path(ref.location).resolve())
    return {"family": "sdxl" if sdxl else "sd", "teacher": teacher, "revision": args.revision, "variant": args.variant,
            "vae": args.pretrained_vae_model_name_or_path, "encoder_configs": digest}


def _vae_config(vae_source: str) -> dict:
    return AutoencoderKL.load_config(vae_source, subfolder=_vae_subfolder(vae_source))
