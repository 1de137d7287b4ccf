"""LoRA file formats as data plus pure functions: one internal form, PEFT/diffusers and kohya names.

Internal form: {diffusers module path: LoraModule}, e.g. "down_blocks.1.attentions.0.proj_in". A module
adds ΔW = (alpha / rank) · up @ down to its base weight: the rule of kohya, ComfyUI, A1111, InvokeAI and
PEFT alike (kohya-ss/sd-scripts networks/lora.py; comfy/lora.py). Writers name keys; the strict reader refuses what it cannot place,
so a key is never dropped silently. No file IO here: safetensors stays in safetensors_io.py.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass

import torch

from .families import SDXL_FAMILY, model_family

KOHYA_PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = "unet."
KOHYA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
PEFT_SUFFIXES = ("lora_A.weight", "lora_B.weight")
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.")
DIFFUSERS_ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' own key (LORA_ADAPTER_METADATA_KEY)


class LoraFormatError(ValueError):
    """A LoRA file that cannot be used as it is (keys it cannot place, NaN or inf, a bad metadata value): the message
    names the keys."""


@dataclass(frozen=True)
class LoraModule:
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]: PEFT lora_A, kohya lora_down
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]: PEFT lora_B, kohya lora_up
    alpha: float  # the update is scaled by alpha / rank

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def delta_weight(module: LoraModule, strength: float = 1.0) -> torch.Tensor:
    """ΔW = strength · (alpha / r) · up @ down in fp32, shaped like the base weight ([out, in] or [out, in, kh, kw])."""
    down, up = module.down.float(), module.up.float().flatten(1)
    delta = (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return delta * (strength * module.scale)


def most_common(values: list) -> object:
    return Counter(values).most_common(1)[0][0]


def kohya_stem(module_path: str) -> str:
    """sd-scripts' name: the prefix plus the module path with every '.' as '_'."""
    return KOHYA_PREFIX + module_path.replace(".", "_")


# -- writers -----------------------------------------------------------------------------------------

def to_peft_keys(modules: dict[str, LoraModule], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """PEFT's names as diffusers' `save_lora_weights` writes them, `unet.<path>.lora_A.weight` / `lora_B.weight`,
    with alpha / r baked into lora_B: the file then loads at the right scale in every diffusers version, with or
    without metadata. Only diffusers loads these keys in full (ComfyUI skips the attention projections)."""
    out = {}
    for path, m in modules.items():
        dtype_of = dtype or m.down.dtype
        out[f"{DIFFUSERS_PREFIX}{path}.lora_A.weight"] = m.down.to(dtype_of).contiguous()
        up = m.up if m.scale == 1.0 else m.up.float() * m.scale  # scale 1: keep the bits (round trips are exact)
        out[f"{DIFFUSERS_PREFIX}{path}.lora_B.weight"] = up.to(dtype_of).contiguous()
    return out


def to_kohya_keys(modules: dict[str, LoraModule], dtype: torch.dtype | None = None,
                  names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """`lora_unet_<name>.lora_down.weight`, `.lora_up.weight` and a 0-dim fp32 `.alpha`.

    `names` maps diffusers paths to other module names (SDXL's sgm names); None keeps diffusers names.
    Every module gets the file's most common alpha A; one with another alpha carries alpha / A in lora_up.
    Why: diffusers' kohya loader turns per-module alphas into an alpha_pattern whose attention keys match
    nothing (measured: rsLoRA with a rank pattern loaded 1e-2 off), while one alpha loads exactly everywhere.
    """
    common = float(most_common([m.alpha for m in modules.values()])) if modules else 1.0
    out = {}
    for path, m in modules.items():
        stem = kohya_stem(names[path] if names is not None else path)
        up = m.up if m.alpha == common else m.up.float() * (m.alpha / common)
        out[f"{stem}.lora_down.weight"] = m.down.to(dtype or m.down.dtype).contiguous()
        out[f"{stem}.lora_up.weight"] = up.to(dtype or m.up.dtype).contiguous()
        out[f"{stem}.alpha"] = torch.tensor(common, dtype=torch.float32)
    return out


# -- the strict reader ---------------------------------------------------------------------------------

def parse_lora(state_dict: dict[str, torch.Tensor], module_shapes: dict[str, tuple[int, ...]],
               metadata: dict[str, str] | None = None, other_names: dict[str, str] | None = None) -> dict[str, LoraModule]:
    """A kohya or PEFT/diffusers UNet LoRA -> internal form; raises LoraFormatError on anything it cannot place.

    `module_shapes`: the UNet's module paths and weight shapes (the only valid targets, and the shapes a LoRA must
    fit). `other_names`: diffusers path -> the other naming a kohya file may use (sgm names), accepted when the
    whole file uses it.
    """
    keys = list(state_dict)
    if not keys:
        raise LoraFormatError("no LoRA keys: the file holds no tensors.")
    _refuse_foreign(keys)
    kohya = [k for k in keys if k.startswith(KOHYA_PREFIX)]
    if kohya and len(kohya) < len(keys):
        other = next(k for k in keys if not k.startswith(KOHYA_PREFIX))
        raise LoraFormatError(f"mixed key schemes: kohya ({kohya[0]}) and another ({other}); a file must use one.")
    if kohya:
        modules = _parse_kohya(state_dict, set(module_shapes), other_names or {})
    else:
        modules = _parse_peft(state_dict, set(module_shapes), metadata or {})
    for path, module in modules.items():
        _check_shapes(path, module, module_shapes[path])
    check_finite(state_dict)
    return modules


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """One NaN or inf in a LoRA turns every image it touches into noise or black once loaded or merged, and the
    tools load it without a word: refused, naming the first such key."""
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise LoraFormatError(f"non-finite values (NaN or inf) in {key}.")


def split_text_encoder(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the UNet part, the text-encoder keys): for a loader that places text-encoder keys itself (diffusers)."""
    text = [k for k in state_dict if k.startswith(TEXT_ENCODER_PREFIXES)]
    return {k: v for k, v in state_dict.items() if not k.startswith(TEXT_ENCODER_PREFIXES)}, text


def _refuse_foreign(keys: list[str]) -> None:
    text = [k for k in keys if k.startswith(TEXT_ENCODER_PREFIXES)]
    if text:
        raise LoraFormatError(f"{len(text)} text-encoder keys (e.g. {text[0]}): an LCM-LoRA is UNet-only; "
                              "this reader handles UNet LoRAs.")
    unknown = [k for k in keys if not k.startswith((KOHYA_PREFIX, DIFFUSERS_PREFIX))]
    if unknown:
        raise LoraFormatError(f"{len(unknown)} keys are neither kohya (lora_unet_...) nor diffusers (unet....): "
                              f"{_some(unknown)}")


def _group(keys: list[str], split) -> dict[str, dict[str, str]]:
    groups: dict[str, dict[str, str]] = {}
    for key in keys:
        stem, suffix = split(key)
        groups.setdefault(stem, {})[suffix] = key
    return groups


def _kohya_names(stems: list[str], module_paths: set[str], other_names: dict[str, str]) -> dict[str, str]:
    """stem -> diffusers path, from the one naming the whole file uses: diffusers block names (SD1/SD2) or sgm
    names (SDXL)."""
    by_diffusers = {kohya_stem(p): p for p in module_paths}
    by_other = {kohya_stem(n): p for p, n in other_names.items()}
    if all(s in by_diffusers for s in stems):
        return by_diffusers
    if by_other and all(s in by_other for s in stems):
        return by_other
    mixed = [s for s in stems if s in by_other] and [s for s in stems if s in by_diffusers]
    if mixed:
        raise LoraFormatError("the file mixes diffusers block names (e.g. "
                              f"{next(s for s in stems if s in by_diffusers)}) with sgm names (e.g. "
                              f"{next(s for s in stems if s in by_other)}); a file must use one naming.")
    unmatched = sorted(s for s in stems if s not in by_diffusers and s not in by_other)
    raise LoraFormatError(f"{len(unmatched)} kohya modules match no UNet module: {_some(unmatched)}")


def _parse_kohya(state_dict: dict, module_paths: set[str], other_names: dict[str, str]) -> dict[str, LoraModule]:
    groups = _group(list(state_dict), lambda k: tuple(k.split(".", 1)) if "." in k else (k, ""))
    names = _kohya_names(list(groups), module_paths, other_names)
    modules = {}
    for stem, parts in groups.items():
        _check_parts(stem, parts, KOHYA_SUFFIXES, required=KOHYA_SUFFIXES[:2])
        down, up = state_dict[parts["lora_down.weight"]], state_dict[parts["lora_up.weight"]]
        # A missing alpha means scale 1 in every kohya loader (alpha = rank).
        alpha = state_dict[parts["alpha"]] if "alpha" in parts else torch.tensor(float(down.shape[0]))
        if alpha.numel() != 1:
            raise LoraFormatError(f"{parts['alpha']}: an alpha is one number, this one has shape {tuple(alpha.shape)}.")
        modules[names[stem]] = LoraModule(down=down, up=up, alpha=float(alpha))
    return modules


def _parse_peft(state_dict: dict, module_paths: set[str], metadata: dict[str, str]) -> dict[str, LoraModule]:
    def split(key: str) -> tuple[str, str]:
        body = key[len(DIFFUSERS_PREFIX):]
        for suffix in PEFT_SUFFIXES:
            if body.endswith("." + suffix):
                return body[: -len(suffix) - 1], suffix
        return body, ""  # not a PEFT LoRA weight: the whole key is reported as unmatched below

    groups = _group(list(state_dict), split)
    unmatched = sorted(p for p in groups if p not in module_paths)
    if unmatched:
        raise LoraFormatError(f"{len(unmatched)} diffusers LoRA modules match no UNet module (keys must be "
                              f"unet.<module>.lora_A.weight / lora_B.weight): {_some(unmatched)}")
    scale = _peft_scale(metadata)
    modules = {}
    for path, parts in groups.items():
        _check_parts(path, parts, PEFT_SUFFIXES, required=PEFT_SUFFIXES)
        down, up = state_dict[parts["lora_A.weight"]], state_dict[parts["lora_B.weight"]]
        modules[path] = LoraModule(down=down, up=up, alpha=scale * down.shape[0])
    return modules


def _check_shapes(path: str, m: LoraModule, weight_shape: tuple[int, ...]) -> None:
    """down [r, in(, kh, kw)] and up [out, r(, 1, 1)] must fit the module's weight [out, in(, kh, kw)]."""
    fits = (m.up.dim() >= 2 and m.up.shape[1] == m.down.shape[0] and m.up[0, 0].numel() == 1
            and m.up.shape[0] == weight_shape[0] and m.down[0].numel() == math.prod(weight_shape[1:]))
    if not fits:
        raise LoraFormatError(f"{path}: down {tuple(m.down.shape)} and up {tuple(m.up.shape)} do not fit its weight "
                              f"{tuple(weight_shape)}; is the LoRA for another base model?")


def _peft_scale(metadata: dict[str, str]) -> float:
    """The file's alpha / r from diffusers' adapter metadata; 1 without it (our files bake the scale in).
    Per-module patterns are accepted when they keep one scale (ours do: alpha = r everywhere)."""
    config = adapter_config(metadata)
    if config is None:
        return 1.0
    r, alpha = config["r"], config["lora_alpha"]
    ranks, alphas = config["rank_pattern"], config["alpha_pattern"]
    scales = {alpha / r} | {alphas.get(k, alpha) / ranks.get(k, r) for k in {*ranks, *alphas}}
    if len(scales) > 1 or config.get("use_rslora"):
        raise LoraFormatError(f"{DIFFUSERS_ADAPTER_METADATA} gives modules different scales (patterns or rsLoRA), "
                              "which this reader does not apply; load the file with diffusers' load_lora_weights.")
    return scales.pop()


ADAPTER_COMPONENTS = ("text_encoder.", "text_encoder_2.")  # besides the UNet's "unet." (and unprefixed) keys


def adapter_config(metadata: dict[str, str]) -> dict | None:
    """The UNet's LoraConfig from diffusers' `lora_adapter_metadata` (JSON, keys prefixed "unet." as diffusers writes
    them, or unprefixed), None when absent. Every component's r, lora_alpha and patterns are checked first: diffusers
    builds its LoraConfigs from them and this reader its scale, so a list, a zero rank or a word would otherwise stop
    either with an AttributeError or a ZeroDivisionError."""
    key = DIFFUSERS_ADAPTER_METADATA
    raw = metadata.get(key)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoraFormatError(f"{key}: not valid JSON ({err}).") from None
    if not isinstance(config, dict):
        raise LoraFormatError(f"{key}: expected a JSON object (a LoraConfig), got {type(config).__name__}.")
    for prefix in ADAPTER_COMPONENTS:
        component = {k.removeprefix(prefix): v for k, v in config.items() if k.startswith(prefix)}
        if component:
            _checked_lora_config(component, f"{key} {prefix}")
    unet = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in config.items() if not k.startswith(ADAPTER_COMPONENTS)}
    return _checked_lora_config(unet, f"{key} ")


def _checked_lora_config(config: dict, name: str) -> dict:
    """A LoraConfig's r, lora_alpha, rank_pattern and alpha_pattern as positive numbers (absent: r 1, alpha r)."""
    checked = dict(config)
    checked["r"] = number(config.get("r", 1), f"{name}r", integer=True)
    checked["lora_alpha"] = number(config.get("lora_alpha", checked["r"]), f"{name}lora_alpha")
    for pattern, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        values = config.get(pattern) or {}
        if not isinstance(values, dict):
            raise LoraFormatError(f"{name}{pattern} = {values!r}: expected a JSON object of module: value.")
        checked[pattern] = {m: number(v, f"{name}{pattern}[{m!r}]", integer) for m, v in values.items()}
    return checked


def number(value: object, name: str, integer: bool = False, allow_zero: bool = False) -> float | int:
    """`value` (a metadata string, a JSON or YAML number) as a finite number above 0 (or at least 0), else a
    LoraFormatError naming `name`. These values divide (alpha / r, T / N) or scale every weight: zero, NaN or a word
    would otherwise surface as a ZeroDivisionError deep in a loader, or as images that are quietly wrong."""
    try:
        x = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError, OverflowError):
        x = math.nan
    if not (math.isfinite(x) and (x >= 0 if allow_zero else x > 0) and (x.is_integer() or not integer)):
        raise LoraFormatError(f"{name} = {value!r}: expected a {'whole ' if integer else ''}number "
                              f"{'at least 0' if allow_zero else 'above 0'}.")
    return int(x) if integer else x


def diffusers_adapter_metadata(modules: dict[str, LoraModule]) -> dict[str, str]:
    """diffusers' own `lora_adapter_metadata` for a file whose scale is baked in (alpha = r everywhere), so a
    loader that reads it builds the right LoraConfig, mixed ranks included."""
    ranks = {path: m.rank for path, m in modules.items()}
    r = most_common(list(ranks.values()))
    pattern = {re.escape(path): rank for path, rank in ranks.items() if rank != r}
    config = {"r": r, "lora_alpha": r, "target_modules": sorted(modules), "rank_pattern": pattern,
              "alpha_pattern": pattern}
    return {DIFFUSERS_ADAPTER_METADATA: json.dumps({DIFFUSERS_PREFIX + k: v for k, v in config.items()}, sort_keys=True)}


def _check_parts(stem: str, parts: dict[str, str], allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    extra = sorted(k for s, k in parts.items() if s not in allowed)
    if extra:
        raise LoraFormatError(f"{stem}: unexpected keys {_some(extra)} (allowed suffixes: {', '.join(allowed)}).")
    missing = [s for s in required if s not in parts]
    if missing:
        raise LoraFormatError(f"{stem}: missing {', '.join(missing)}.")


def _some(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# -- what the file says about itself ----------------------------------------------------------------

@dataclass(frozen=True)
class BaseModel:
    """The base family as kohya, A1111 and ModelSpec name it."""

    ss_base_model_version: str  # sd-scripts: sd_v1, sd_v2 (+ "_v" for v-prediction), sdxl_base_v1-0
    v2: bool
    architecture: str  # ModelSpec id, "/lora" appended for adapters
    implementation: str
    sgm_names: bool  # kohya files for SDXL use sgm block names


def base_model(unet_config: dict, prediction_type: str) -> BaseModel:
    """The UNet's family (families.model_family) as the tools name it. SSD-1B and Vega are SDXL to kohya, A1111 and
    ModelSpec, which have no ids of their own for them; their files use the same sgm block names."""
    family = model_family(unet_config)
    v = prediction_type == "v_prediction"
    if family in SDXL_FAMILY:
        return BaseModel("sdxl_base_v1-0", False, "stable-diffusion-xl-v1-base",
                         "https://github.com/Stability-AI/generative-models", sgm_names=True)
    if family == "sd2":
        return BaseModel("sd_v2" + ("_v" if v else ""), True,
                         "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512", "diffusers", sgm_names=False)
    return BaseModel("sd_v1" + ("_v" if v else ""), False, "stable-diffusion-v1", "diffusers", sgm_names=False)


USAGE_HINT = ("LCM-LoRA: sample with the LCM sampler (diffusers LCMScheduler; ComfyUI sampler 'lcm'; A1111 'LCM'), "
              "4-8 steps (1-2 work), CFG 1-2 (diffusers guidance_scale 1 = no CFG).")


def kohya_metadata(modules: dict[str, LoraModule], base: BaseModel, title: str, resolution: int,
                   prediction_type: str, date: str) -> dict[str, str]:
    """sd-scripts' `ss_*` minimum set and the ModelSpec 1.0.1 keys, as A1111, ComfyUI and InvokeAI read them.
    Hashes are added where the file's bytes are known (export.py)."""
    ranks = [m.rank for m in modules.values()]
    alphas = [m.alpha for m in modules.values()]
    dim, alpha = most_common(ranks), most_common(alphas)
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": _number(alpha),
        # sd-scripts' networks.lora adapts 3x3 convs only when given conv_dim: say so when the LoRA has them.
        "ss_network_args": json.dumps({"conv_dim": str(dim), "conv_alpha": _number(alpha)}
                                      if any(m.down.dim() == 4 and m.down.shape[-1] > 1 for m in modules.values())
                                      else {}),
        "ss_base_model_version": base.ss_base_model_version,
        "ss_v2": str(base.v2),
        "ss_output_name": title,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_training_comment": USAGE_HINT,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{base.architecture}/lora",
        "modelspec.implementation": base.implementation,
        "modelspec.title": title,
        "modelspec.date": date,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.usage_hint": USAGE_HINT,
        "modelspec.tags": "LCM,LCM-LoRA,latent consistency,few-step",
        "modelspec.description": "LCM-LoRA distilled with lcm-lora: few-step sampling for this base model and its "
                                 "fine-tunes.",
    }


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
