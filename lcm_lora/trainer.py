"""The training loop: Accelerate setup, then accumulate, step and tick maintenance in one function.

Precision is what the user asked for: frozen weights in the `--mixed_precision` dtype, LoRA
weights in fp32, and every network call inside `accelerator.autocast()`, which is a no-op for
`no` (the reference trainer's dtype-less autocast silently ran fp32 runs in bf16 on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
from pathlib import Path
from typing import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from . import export, hub, model_card
from .checkpoint import (DataPosition, TrainingStopped, checkpoint_step, checkpoints, register_lora_checkpointing,
                         save_checkpoint)
from .conditioning import Cond, encode_text, fixed_time_ids, time_ids, uncond_for, unet_kwargs
from .config import ConfigError, DataArgs, OptimArgs, TrainConfig, to_yaml
from .data import BadSampleLog, DataError, load_source, make_dataloader
from .data.cache import make_cached_dataloader, read_manifest, sample_latents
from .data.loader import input_ids_key, tokenize
from .data.shards import make_shard_dataloader
from .distill import lcd_loss
from .models import TargetEMA, Teacher, adapter_disabled, attach_lora, is_sdxl, load_teacher, teacher_fingerprint
from .preflight import check_training, plan_summary
from .run_dir import OutputLock, RunPlan, remove_earlier_run
from .run_log import MetricsLog, validation_dir
from .schedule import ddim_timesteps

logger = logging.getLogger(__name__)
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}



def cpu_processes() -> bool:
    """True for several processes without GPUs (torchrun on CPU): Accelerate then needs cpu=True to
    start gloo; without it each process silently trains alone, all writing the same output_dir."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(config: TrainConfig) -> Accelerator:
    out = Path(config.run.output_dir)
    report_to = None if config.run.report_to == "none" else config.run.report_to
    return Accelerator(
        cpu=cpu_processes(),
        gradient_accumulation_steps=config.optim.gradient_accumulation_steps,
        mixed_precision=config.run.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / config.run.logging_dir)),
    )


def prepare_models(config: TrainConfig, teacher: Teacher, accelerator: Accelerator) -> torch.nn.Module:
    """Freeze encoders in the run's dtype; put an fp32 LoRA on the UNet; set speed switches."""
    dtype, device = WEIGHT_DTYPES[config.run.mixed_precision], accelerator.device
    for module in teacher.text_encoders:  # none when training from cached encodings
        module.requires_grad_(False).to(device, dtype).eval()
    if teacher.vae is not None:
        teacher.vae.requires_grad_(False).to(device, vae_dtype(teacher, dtype)).eval()
    unet = attach_lora(teacher.unet.to(device, dtype), config.lora)
    if config.run.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.run.enable_xformers_memory_efficient_attention:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as err:  # diffusers raises several types; the message is what matters
            raise ConfigError(f"--enable_xformers_memory_efficient_attention: {err}. "
                              "Install it with pip install 'lcm-lora[xformers]' or drop the flag.") from err
    if config.run.torch_compile:
        unet.compile()  # in place: the student, teacher (LoRA off) and target calls all run the compiled forward
    if config.run.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return unet


def vae_dtype(teacher: Teacher, dtype: torch.dtype) -> torch.dtype:
    """The SDXL VAE overflows in fp16 (NaN latents: kohya-ss/sd-scripts#881), so under fp16 an SDXL-family VAE
    encodes in fp32 unless its config says it is safe (`force_upcast: false`, as madebyollin/sdxl-vae-fp16-fix
    sets it), the rule diffusers' SDXL pipeline applies when it decodes."""
    if dtype == torch.float16 and is_sdxl(teacher.unet.config) and teacher.vae.config.get("force_upcast", True):
        return torch.float32
    return dtype


def make_optimizer(params: list[torch.nn.Parameter], o: OptimArgs, num_processes: int = 1) -> torch.optim.Optimizer:
    """AdamW over the LoRA tensors (bitsandbytes' 8-bit AdamW with --use_8bit_adam), as the trainer and the step
    benchmark both build it; --scale_lr scales the rate as diffusers' scripts do."""
    lr = o.learning_rate * (o.train_batch_size * o.gradient_accumulation_steps * num_processes if o.scale_lr else 1)
    kwargs = dict(lr=lr, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.adam_weight_decay, eps=o.adam_epsilon)
    if o.use_8bit_adam:
        import bitsandbytes as bnb  # preflight checked it is installed

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def export_info(config: TrainConfig, prediction_type: str, unet_config: dict, step: int,
                config_changes: tuple[str, ...] = ()) -> export.ExportInfo:
    teacher_name = config.model.pretrained_teacher_model
    return export.ExportInfo(config_flat=config.to_flat_dict(), teacher=teacher_name, prediction_type=prediction_type,
                             steps=step, unet_config=dict(unet_config), config_changes=config_changes,
                             output_name=config.run.output_name or export.default_output_name(teacher_name))


def export_lora(accelerator: Accelerator, unet, config: TrainConfig, teacher: Teacher, step: int, out_dir: Path,
                export_formats: tuple[str, ...] = ("diffusers",), config_changes: tuple[str, ...] = ()) -> list[Path]:
    """The LoRA as users get it, in each of `export_formats` (validation reads the diffusers file)."""
    unet = accelerator.unwrap_model(unet)
    info = export_info(config, teacher.prediction_type, unet.config, step, config_changes)
    return export.write_formats(export.lora_modules(unet), out_dir, export_formats,
                                export.DTYPES[config.run.export_dtype], info)


def write_run_card(info: export.ExportInfo, config: TrainConfig, files: list[Path], repo_id: str | None) -> Path:
    """The run's model card beside its LoRA files, showing its last validation grid (preflight made sure that a
    README.md already there is the run's own card, or --overwrite allows replacing it)."""
    out = Path(config.run.output_dir)
    grid = model_card.validation_grid(out, info.steps)
    facts = model_card.card_facts(info, out, files, config.run.license, repo_id, *(grid or (None, None)))
    return model_card.write_card(out, facts)


def hub_repo(accelerator: Accelerator, config: TrainConfig) -> str | None:
    """With --push_to_hub, the repo's full id, the repo created (or found) by the main process before anything
    loads, so a bad token or repo id stops the run now rather than after training; every process gets its answer."""
    if not config.run.push_to_hub:
        return None
    answer = None
    if accelerator.is_main_process:
        try:
            answer = (hub.create_repo_id(hub.repo_name(config.run)), None)
        except hub.HubError as err:
            answer = (None, str(err))
    repo_id, refused = gather_object([answer])[0]
    if refused:
        raise hub.HubError(refused)
    return repo_id


def log_validation(accelerator, unet, config: TrainConfig, teacher: Teacher, step: int, log: MetricsLog) -> None:
    """The LoRA exported to validation/step-N/, scored against the teacher there (lcm_lora.validation); its
    numbers go to metrics.jsonl and the trackers, its sheets to the trackers that take images."""
    from .validation import tracker_scalars, validate

    out = validation_dir(config.run.output_dir, step)
    export_lora(accelerator, unet, config, teacher, step, out)
    cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # the run draws the same numbers with or without validation
        record, images = validate(config, out, step, str(accelerator.device))
    if cuda:
        torch.cuda.empty_cache()  # the validation pipeline's blocks go back before training resumes
    log.append(record)
    accelerator.log(tracker_scalars(record), step=step)
    for tracker in accelerator.trackers:
        for name, image in images.items():
            if tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_image(name, np.asarray(image), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({name: wandb.Image(image)}, step=step)


def report_run(config: TrainConfig, log: MetricsLog, final_step: int) -> None:
    """Plots of the run, and the step that agrees best with the teacher (main process, at the end)."""
    from .run_log import best_summary, best_validation, write_plots

    plots = write_plots(config.run.output_dir)
    print(plots if isinstance(plots, str) else "plots: " + ", ".join(str(p) for p in plots))
    best = best_validation(log.records())
    if best is not None:
        where = ("the LoRA saved above" if best["step"] == final_step else
                 f"lcm-lora export --checkpoint {config.run.output_dir} --from_checkpoint best --output_dir DIR")
        print(f"{best_summary(best)}; {where}")


def validation_due(config: TrainConfig, step: int) -> bool:
    """Every --validation_steps and at the last step, when there are prompts to draw."""
    r = config.run
    return bool(r.validation_steps and r.validation_prompts) and (
        step % r.validation_steps == 0 or step == config.optim.max_train_steps)


def unet_fns(unet, raw_unet, dtype: torch.dtype):
    """(student, teacher, target) callables (z_t, t, c) -> output, all on one UNet.

    The student goes through Accelerate's wrapper (DDP syncs its gradients); the no-grad teacher
    (adapter off) and target (adapter on) call the unwrapped module.
    """

    def student(z, t, c):
        return unet(z.to(dtype), t, **unet_kwargs(c, dtype), return_dict=False)[0].float()

    def teacher(z, t, c):
        with adapter_disabled(raw_unet):
            return raw_unet(z.to(dtype), t, **unet_kwargs(c, dtype), return_dict=False)[0].float()

    def target(z, t, c):
        return raw_unet(z.to(dtype), t, **unet_kwargs(c, dtype), return_dict=False)[0].float()

    return student, teacher, target


def ema_target(target, ema: TargetEMA):
    """The target f_{theta-}: the same LoRA'd UNet with the EMA weights swapped in for the call."""

    def fn(z, t, c):
        with ema.swapped_in():
            return target(z, t, c)

    return fn


@torch.no_grad()
def encode_batch(teacher: Teacher, batch: dict, device, scaling_factor: float, d: DataArgs) -> tuple[torch.Tensor, Cond]:
    """x0 = scaled VAE latent sample (fp32) and the conditioning c (lcm_lora.conditioning), from pixels and token
    ids or from cached encodings (the same posterior sample, drawn from the stored distribution). SDXL's time ids
    are the inference default (--use_fix_crop_and_size) or each image's real size and flip-corrected crop."""
    if "latent_parameters" in batch:
        x0 = sample_latents(batch["latent_parameters"].to(device), scaling_factor)
        c = {"context": batch["encoder_hidden_states"].to(device)}
        if "pooled_embeds" in batch:
            c["pooled"] = batch["pooled_embeds"].to(device)
    else:
        x0 = encode_images(teacher.vae, batch["pixel_values"].to(device, teacher.vae.dtype), d.vae_encode_batch_size)
        x0 = x0 * scaling_factor
        ids = tuple(batch[input_ids_key(i)].to(device) for i in range(len(teacher.text_encoders)))
        c = encode_text(teacher.text_encoders, ids)
    if "pooled" in c:
        c["time_ids"] = (fixed_time_ids(d.resolution, len(x0)) if d.use_fix_crop_and_size else
                         time_ids(batch["original_size"], batch["crop_top_left"], (d.resolution, d.resolution)))
        c["time_ids"] = c["time_ids"].to(device)
    if not torch.isfinite(x0).all():  # the step's loss is then non-finite too, and NonFiniteGuard skips it
        logger.warning("non-finite VAE latents in this batch: the update is skipped. Encode in fp32 or bf16, or give "
                       "an fp16-safe VAE with --pretrained_vae_model_name_or_path.")
    return x0, c


def encode_images(vae, pixels: torch.Tensor, chunk: int) -> torch.Tensor:
    """A posterior sample of each image's latent (fp32), encoded `chunk` images at a time to bound the VAE's memory."""
    return torch.cat([vae.encode(part).latent_dist.sample().float() for part in pixels.split(chunk)])


@torch.no_grad()
def empty_prompt(teacher: Teacher, device) -> Cond:
    """The empty prompt's conditioning [1, ...], for the teacher's uncond branch."""
    return encode_text(teacher.text_encoders, tuple(tokenize(t, [""]).to(device) for t in teacher.tokenizers))


def make_data(config: TrainConfig, teacher: Teacher, accelerator: Accelerator):
    """(data loader, the cache's empty-prompt conditioning or None, VAE scaling factor) for images, shards or a
    cache.

    Map-style loaders go through `accelerator.prepare` (it shards them by rank); a shard stream splits
    its shards by rank itself and is not wrapped (Accelerate would read every shard on the main process)."""
    d, o, seed = config.data, config.optim, config.run.seed or 0
    if d.encodings_dir:
        manifest = read_manifest(d.encodings_dir, teacher_fingerprint(config.model), d.resolution)
        loader, empty = make_cached_dataloader(d, manifest, o.train_batch_size, seed)
        return accelerator.prepare(loader), empty, manifest["scaling_factor"]
    if d.train_shards_path_or_url:
        loader = make_shard_dataloader(d, teacher.tokenizers, o.train_batch_size, seed, accelerator.process_index,
                                       accelerator.num_processes)
        return loader, None, teacher.vae.config.scaling_factor
    loader = make_dataloader(load_source(d), teacher.tokenizers, d, o.train_batch_size, seed)
    return accelerator.prepare(loader), None, teacher.vae.config.scaling_factor


def micro_batches(accelerator: Accelerator, dataloader, position: DataPosition, log: BadSampleLog) -> Iterator[dict]:
    """Batches forever, epoch after epoch, from `position` on (advancing it), each batch's skipped samples
    counted in `log`. A shard stream cannot seek: resuming reads and drops the epoch's batches already used."""
    stream = isinstance(dataloader.dataset, torch.utils.data.IterableDataset)
    while True:
        position.start_epoch(dataloader, stream)
        used = position.batches
        batches = accelerator.skip_first_batches(dataloader, used) if used and not stream else dataloader
        full = 0 if stream else used  # complete batches of this epoch so far
        for batch in batches:
            samples = batch.get("pixel_values", batch.get("latent_parameters"))
            log.add(0 if samples is None else len(samples), batch["skipped"])
            if samples is None:  # a stream's skips after its last full batch
                continue
            full += 1
            if full <= used:
                continue
            position.batches = full
            yield batch
        if full == 0:
            raise DataError(f"process {accelerator.process_index} got no complete batch in a whole epoch "
                            f"({log.summary()}). Check the data source, or lower --train_batch_size.")
        position.end_epoch(dataloader, stream)


class StopSignals:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to stop after the current step, checkpoint and exit.
    The handlers stay until the loop ends, so repeats are absorbed: a signal sent to the whole process group
    reaches every process, and torchrun forwards its own copy to its workers, so each may get it twice."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received, self.previous = 0, {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.received:
            logger.warning("%s received again: already stopping after this step", signal.Signals(signum).name)
            return
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def requested(self, accelerator: Accelerator) -> int:
        """The signal any process received (0: none); every process gets the same answer."""
        if accelerator.num_processes == 1:
            return self.received
        return int(accelerator.reduce(torch.tensor([self.received], device=accelerator.device), "max").item())


class NonFiniteGuard:
    """Skips optimizer updates whose loss or gradient norm is not finite, counting them; after `limit` in a
    row the run stops, its checkpoints (all from finite weights) kept. The decision is gathered, so every
    process skips the same updates. Under fp16 the grad scaler already skips overflowing steps (normal while
    it calibrates), so there only the loss counts."""

    def __init__(self, accelerator: Accelerator, limit: int) -> None:
        self.accelerator, self.limit, self.in_a_row, self.total = accelerator, limit, 0, 0

    def finite(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, step: int, out: Path) -> bool:
        values = [loss.detach().float().reshape(1)]
        if grad_norm is not None and self.accelerator.scaler is None:
            values.append(grad_norm.detach().float().reshape(1).to(values[0].device))
        if bool(torch.isfinite(self.accelerator.gather(torch.cat(values))).all()):
            self.in_a_row = 0
            return True
        self.in_a_row, self.total = self.in_a_row + 1, self.total + 1
        logger.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d in all)",
                       step, self.in_a_row, self.total)
        if self.in_a_row >= self.limit:
            latest = checkpoints(out)
            raise TrainingStopped(
                f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient (--max_consecutive_"
                f"nonfinite_steps {self.limit}), up to step {step}. "
                + (f"The last checkpoint, {latest[-1]}, holds finite weights: resume from it with a lower "
                   "--learning_rate, or --mixed_precision bf16 instead of fp16." if latest else
                   "No checkpoint was written yet; lower --learning_rate or use --mixed_precision bf16."))
        return False


def train(config: TrainConfig) -> Path:
    """Distill an LCM-LoRA; returns the folder holding pytorch_lora_weights.safetensors and its model card. With
    --push_to_hub the folder is then uploaded (hub.py), a finished run's too."""
    plan = check_training(config)
    out = Path(config.run.output_dir)
    accelerator = make_accelerator(config)
    repo_id = hub_repo(accelerator, config)
    with claimed(accelerator, out):
        if plan.finished:
            accelerator.print(f"{out} holds the finished run ({plan.checkpoint.name}, --max_train_steps "
                              f"{config.optim.max_train_steps}, LoRA exported): nothing to do. Raise "
                              "--max_train_steps to train on.")
            if repo_id and accelerator.is_main_process:
                refresh_card(config, plan, repo_id)  # its snippet now names the repo
            end_processes(accelerator)
        else:
            accelerator.print(plan_summary(config, plan))
            if accelerator.is_main_process:
                remove_earlier_run(plan.replace)  # only with --overwrite: check_training refused it otherwise
            distill(config, plan, accelerator, repo_id)
        if repo_id and accelerator.is_main_process:  # after end_processes: the other processes have exited
            accelerator.print(f"uploaded {out} to {hub.upload(out, repo_id, config.run.logging_dir)}")
    return out


def refresh_card(config: TrainConfig, plan: RunPlan, repo_id: str) -> Path:
    """A finished run's card rewritten from its config and files, read without any weights."""
    from .models import teacher_prediction_type, unet_config

    info = export_info(config, teacher_prediction_type(config.model), unet_config(config.model),
                       checkpoint_step(plan.checkpoint), tuple(plan.config_changes))
    paths = export.output_paths(config.run.output_dir, config.run.export_formats, info.output_name).values()
    return write_run_card(info, config, [p for p in paths if p.is_file()], repo_id)


@contextlib.contextmanager
def claimed(accelerator: Accelerator, out: Path):
    """The main process holds the output folder's lock for the run; if it cannot, every process stops."""
    lock, refused = OutputLock(out), None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except ConfigError as err:
            refused = str(err)
    refused = gather_object([refused])[0]  # the main process's answer, on every process
    if refused:
        raise ConfigError(refused)
    try:
        yield
    finally:
        lock.release()


def distill(config: TrainConfig, plan: RunPlan, accelerator: Accelerator, repo_id: str | None = None) -> Path:
    """The run itself: load, resume if planned, loop, and export the LoRA with its model card (whose snippet loads
    it from `repo_id` when given); a stop signal checkpoints and raises."""
    out = Path(config.run.output_dir)
    if config.run.seed is not None:
        set_seed(config.run.seed)
    teacher = load_teacher(config.model, encoders=not config.data.encodings_dir)
    unet = prepare_models(config, teacher, accelerator)
    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}  # the LoRA, named for the EMA
    params = list(trainable.values())  # a list: clipping must see them again
    optimizer = make_optimizer(params, config.optim, accelerator.num_processes)
    o = config.optim
    lr_scheduler = get_scheduler(o.lr_scheduler, optimizer, num_warmup_steps=o.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=o.max_train_steps * accelerator.num_processes)
    dataloader, cached_empty, scaling_factor = make_data(config, teacher, accelerator)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    register_lora_checkpointing(accelerator)

    device, dtype = accelerator.device, WEIGHT_DTYPES[config.run.mixed_precision]
    alphas_cumprod = teacher.noise_scheduler.alphas_cumprod.to(device, torch.float32)
    tau = ddim_timesteps(teacher.noise_scheduler.config.num_train_timesteps, config.distill.num_ddim_timesteps).to(device)
    with torch.no_grad(), accelerator.autocast():  # the uncond branch's prompt; SDXL's pipeline may use zeros
        empty = None if teacher.force_zeros_for_empty_prompt else cached_empty or empty_prompt(teacher, device)
    bad_samples = BadSampleLog(config.data.max_bad_samples_fraction)
    student, teacher_fn, target = unet_fns(unet, accelerator.unwrap_model(unet), dtype)
    ema = TargetEMA(trainable, config.distill.ema_decay) if config.distill.ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
        target = ema_target(target, ema)
    position = DataPosition()
    accelerator.register_for_checkpointing(position)

    global_step = 0
    if plan.checkpoint is not None:
        accelerator.load_state(str(plan.checkpoint))
        global_step = checkpoint_step(plan.checkpoint)
        accelerator.print(f"resumed from {plan.checkpoint} at step {global_step}")
    log = MetricsLog(out)
    if accelerator.is_main_process:
        log.keep_up_to(global_step)  # what a stopped run logged after its checkpoint is trained again
        (out / "config.yaml").write_text(to_yaml(config))
        if accelerator.trackers == [] and config.run.report_to != "none":
            accelerator.init_trackers(config.run.tracker_project_name, config={k: str(v) for k, v in config.to_flat_dict().items()})

    progress = tqdm(total=o.max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc="distill")
    guard = NonFiniteGuard(accelerator, config.run.max_consecutive_nonfinite_steps)
    record = {"config": config.to_flat_dict(), "config_changes": plan.config_changes}

    def checkpoint_now() -> Path:
        return save_checkpoint(accelerator, out, global_step, config.run.checkpoints_total_limit,
                               4 * sum(p.numel() * p.element_size() for p in params),  # LoRA, Adam's moments, EMA
                               record)

    batches = micro_batches(accelerator, dataloader, position, bad_samples) if global_step < o.max_train_steps else ()
    stop_signal, saved = 0, None
    with StopSignals() as signals:  # until the run's last write, however it ends
        unet.train()
        for batch in batches:
            # Accumulate gradients.
            with accelerator.accumulate(unet), accelerator.autocast():
                x0, c = encode_batch(teacher, batch, device, scaling_factor, config.data)
                loss = lcd_loss(student, teacher_fn, target, x0, c, uncond_for(c, empty), alphas_cumprod, tau,
                                config.distill, teacher.prediction_type).mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:  # the optimizer step; skipped if anything is not finite
                    grad_norm = accelerator.clip_grad_norm_(params, o.max_grad_norm or math.inf)
                    if guard.finite(loss, grad_norm, global_step + 1, out):
                        optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.update()
            # Maintenance once per optimizer step: log, checkpoint, validate.
            global_step += 1
            progress.update(1)
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}
            progress.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
            if config.run.checkpointing_steps and global_step % config.run.checkpointing_steps == 0:
                saved = checkpoint_now()
            if accelerator.is_main_process:
                log.append({"step": global_step, **logs})
                if validation_due(config, global_step):
                    log_validation(accelerator, unet, config, teacher, global_step, log)
            if global_step >= o.max_train_steps:
                break
            stop_signal = signals.requested(accelerator)
            if stop_signal:
                break
        progress.close()
        if stop_signal:
            if saved is None or checkpoint_step(saved) != global_step:  # the same on every process: saving is collective
                saved = checkpoint_now()
            end_processes(accelerator)
            raise TrainingStopped(f"stopped by {signal.Signals(stop_signal).name} after step {global_step}; the "
                                  f"state is in {saved}. Resume with the same command plus --resume_from_checkpoint "
                                  "latest.", exit_code=128 + stop_signal)
        accelerator.print(f"data: {BadSampleLog.combined(gather_object([bad_samples])).summary()}")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            changes = tuple(plan.config_changes)
            paths = export_lora(accelerator, unet, config, teacher, global_step, out, config.run.export_formats, changes)
            info = export_info(config, teacher.prediction_type, accelerator.unwrap_model(unet).config, global_step,
                               changes)
            for path in [*paths, write_run_card(info, config, paths, repo_id)]:
                accelerator.print(f"saved {path}")
            report_run(config, log, global_step)
    end_processes(accelerator)
    return out


def end_processes(accelerator: Accelerator) -> None:
    """Trackers closed and the process group torn down by every process together: a rank 0 that destroys it
    after the others have exited can hang for good (pytorch/pytorch#75097; seen once in CI with gloo)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()

