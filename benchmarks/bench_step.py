"""Overhead of a training step over its ideal cost, measured in one process.

    python benchmarks/bench_step.py                          # bundled tiny teacher, CPU
    python benchmarks/bench_step.py --teacher DIR --resolution 512 --batch_size 4 --mixed_precision bf16  # a GPU
    python benchmarks/bench_step.py --teacher teacher-sdxl      # the bundled tiny SDXL teacher
    python benchmarks/make_shaped.py --arch sdxl --out /tmp/sdxl-shaped   # SDXL's real configs, random weights
    python benchmarks/bench_step.py --teacher /tmp/sdxl-shaped --resolution 1024 --batch_size 4 --mixed_precision bf16

"step" is the trainer's own step from images: VAE and text encoding, `lcd_loss` (student forward+backward
at B, teacher forward at 2B, target forward at B), clipping and the optimizer. "cached" is the same step
from cached encodings (`lcm-lora cache`, `--encodings_dir`): a posterior sample instead of the encoders.
"ideal" is the three UNet calls alone on the same tensors (with SDXL's pooled text and time ids for
the SDXL family). The ratios step / ideal and cached / ideal
are what the trainer adds around the UNet. Timings alternate step, ideal, cached, step, ... and the
medians of the paired ratios are printed. Each is also counted in FLOPs (lcm_lora.perf: every matmul and convolution,
forward and backward), so the achieved TFLOP/s and, on a GPU in the peak table or with --peak_tflops, the MFU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lcm_lora.conditioning import cat_cond
from lcm_lora.config import TrainConfig
from lcm_lora.data.loader import make_batch
from lcm_lora.distill import lcd_loss
from lcm_lora.models import load_teacher
from lcm_lora.perf import count_flops, mfu, peak_tflops
from lcm_lora.schedule import ddim_timesteps
from lcm_lora.trainer import (WEIGHT_DTYPES, encode_batch, make_accelerator, make_optimizer, prepare_models,
                              unet_fns)


def peak_rss_gib() -> float:
    """The process's peak resident memory (Linux reports KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="teacher-eps")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--mixed_precision", default="no")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--torch_compile", action="store_true", help="the trainer's --torch_compile")
    parser.add_argument("--allow_tf32", action="store_true")
    parser.add_argument("--enable_xformers", action="store_true", help="the trainer's xformers attention")
    parser.add_argument("--count_only", action="store_true",
                        help="count the FLOPs of one step, one cached step and the UNet calls, untimed, and stop "
                             "(a CPU can count a GPU configuration's FLOPs)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the device's peak for MFU; default: lcm_lora.perf's table (GPUs only)")
    args = parser.parse_args()

    config = TrainConfig.from_flat_dict({
        "pretrained_teacher_model": args.teacher, "lora_rank": args.lora_rank, "lora_alpha": args.lora_rank,
        "resolution": args.resolution,
        "mixed_precision": args.mixed_precision, "report_to": "none",
        "gradient_checkpointing": args.gradient_checkpointing, "torch_compile": args.torch_compile,
        "allow_tf32": args.allow_tf32, "enable_xformers_memory_efficient_attention": args.enable_xformers,
        "output_dir": "/tmp/lcm-lora-bench"})
    accelerator = make_accelerator(config)
    teacher = load_teacher(config.model)
    unet = prepare_models(config, teacher, accelerator)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config.optim)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    device, dtype = accelerator.device, WEIGHT_DTYPES[args.mixed_precision]
    student, teacher_fn, target = unet_fns(unet, accelerator.unwrap_model(unet), dtype)
    alphas_cumprod = teacher.noise_scheduler.alphas_cumprod.to(device)
    tau = ddim_timesteps(1000, 50).to(device)

    b, r = args.batch_size, args.resolution
    geometry = {"original_size": (r, r), "crop_top_left": (0, 0)}
    batch = make_batch([(torch.rand(3, r, r) * 2 - 1, geometry, "a red circle")] * b, [], tuple(teacher.tokenizers))
    scaling = teacher.vae.config.scaling_factor
    x0, c = encode_batch(teacher, batch, device, scaling, config.data)
    with torch.no_grad():
        cached = {"latent_parameters": teacher.vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist.parameters,
                  "encoder_hidden_states": c["context"]}
        if "pooled" in c:  # SDXL: the cache stores the pooled text too; time ids are rebuilt per batch
            cached["pooled_embeds"] = c["pooled"]
    t = torch.full((b,), 499, device=device)

    def train_step(data: dict) -> None:
        with accelerator.autocast():
            x0, c = encode_batch(teacher, data, device, scaling, config.data)
            loss = lcd_loss(student, teacher_fn, target, x0, c, c, alphas_cumprod, tau, config.distill,
                            teacher.prediction_type).mean()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def step() -> None:
        train_step(batch)

    def cached_step() -> None:
        train_step(cached)

    def ideal() -> None:
        with accelerator.autocast():
            student(x0, t, c).float().mean().backward()
            with torch.no_grad():
                teacher_fn(torch.cat([x0, x0]), torch.cat([t, t]), cat_cond(c, c))
                target(x0, t, c)

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if args.count_only:
        for name, fn in (("step", step), ("ideal", ideal), ("cached", cached_step)):
            print(f"{name:6} {count_flops(fn) / 1e12:.3f} TFLOP counted (batch {b}, resolution {r})")
        return
    started = time.perf_counter()
    for fn in (step, ideal, cached_step, step, ideal, cached_step):  # warm-up (and compilation)
        fn()
    warm_up = time.perf_counter() - started
    flops = {name: count_flops(fn) for name, fn in (("step", step), ("ideal", ideal), ("cached", cached_step))}
    steps, ideals, cacheds = [], [], []
    for _ in range(args.repeats):
        steps.append(timed(step))
        ideals.append(timed(ideal))
        cacheds.append(timed(cached_step))
    n_unet = sum(p.numel() for p in accelerator.unwrap_model(unet).parameters() if not p.requires_grad)
    encoders = ", ".join(type(e).__name__ for e in teacher.text_encoders)
    print(f"{args.teacher}: UNet {n_unet / 1e6:.1f}M parameters, text encoders {encoders}, LoRA rank {args.lora_rank}")
    print(f"device {device}, threads {torch.get_num_threads()}, batch {b}, resolution {r}, "
          f"precision {args.mixed_precision}, {args.repeats} triples")
    for name, times in (("step", steps), ("ideal", ideals), ("cached", cacheds)):
        print(f"{name:6} median {statistics.median(times) * 1000:.1f} ms "
              f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f})")
    # Each step is timed next to its ideal, so the median of the pairs' ratios cancels slow drifts of a
    # shared machine that the ratio of the two medians still carries.
    for name, times in (("step", steps), ("cached", cacheds)):
        paired = statistics.median(s / i for s, i in zip(times, ideals))
        print(f"ratio {name}/ideal {paired:.3f} (median of {args.repeats} paired ratios; "
              f"ratio of medians {statistics.median(times) / statistics.median(ideals):.3f})")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or peak_tflops(device_name, args.mixed_precision, args.allow_tf32)
    for name, times in (("step", steps), ("ideal", ideals), ("cached", cacheds)):
        achieved, share = mfu(flops[name], statistics.median(times), peak)
        print(f"{name:6} {flops[name] / 1e12:.3f} TFLOP counted, {achieved:.2f} TFLOP/s achieved"
              + (f", MFU {100 * share:.1f}% of {peak:g} TFLOP/s ({device_name})" if share is not None else
                 f" (no peak known for {device_name}: give --peak_tflops for MFU)"))
    print(f"warm-up (2 of each, with compilation when --torch_compile) {warm_up:.1f} s")
    print(f"peak process memory {peak_rss_gib():.2f} GiB (CPU resident set)")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB; "
              f"trainable LoRA parameters {sum(p.numel() for p in params) / 1e6:.1f}M")


if __name__ == "__main__":
    main()
