"""No command loses or silently mis-uses a user's files: hostile LoRAs, metadata and output paths, each refused with a
one-line `error: ...` naming the file (and the key), before anything is written. The LoRAs are the bundled style
LoRA (diffusers keys, fits teacher-eps) edited with safetensors; merge bakes into the bundled community checkpoint."""

import json
import re

import pytest
import torch

from lcm_lora import export, formats
from lcm_lora.cli import export_main, generate_main, merge_main
from lcm_lora.models import load_unet_config, resolve_teacher
from lcm_lora.world import assets

STYLE = assets.resolve("style-dusk") / export.DIFFUSERS_WEIGHT_NAME
COMMUNITY = resolve_teacher("community-dusk")
UNET_CONFIG = load_unet_config(resolve_teacher("teacher-eps"))
A_KEY = "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight"


def _style() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return export.read_safetensors(STYLE)


def _write(path, tensors, meta=None):
    return export.save_safetensors_atomic(tensors, path, meta or {"format": "pt"})


def _kohya(path, meta=None):
    """The style LoRA with kohya keys."""
    modules, _ = export.read_lora(STYLE, UNET_CONFIG)
    return _write(path, formats.to_kohya_keys(modules), meta)


def _generate(lora, out, *extra):
    return ["--pretrained_model", "teacher-eps", "--lora", str(lora), "--prompt", "a red circle",
            "--num_inference_steps", "1", "--output_dir", str(out), "--device", "cpu", *extra]


def _export(lora, out, *extra):
    return ["--checkpoint", str(lora), "--output_dir", str(out), "--pretrained_teacher_model", "teacher-eps", *extra]


def _merge(lora, out, *extra):
    return ["--checkpoint", str(COMMUNITY), "--lora", str(lora), "--output", str(out),
            "--single_file_config", "teacher-eps", *extra]


COMMANDS = {"generate": (generate_main, _generate, "gen"), "export": (export_main, _export, "exported"),
            "merge": (merge_main, _merge, "merged.safetensors")}


def _refused(command: str, lora, tmp_path, *needles: str) -> str:
    """Run `command` on `lora`: it must exit with one line `error: ...` holding every needle and write nothing."""
    main, args, out = COMMANDS[command]
    with pytest.raises(SystemExit) as exit_:
        main(args(lora, tmp_path / out))
    message = str(exit_.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    assert not (tmp_path / out).exists(), message
    return message


# -- 1. a LoRA must place on the model -----------------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", ["matches no module", "text-encoder keys only", "no tensors"])
def test_a_lora_that_places_on_no_module_is_refused(command, case, tmp_path):
    tensors, meta = _style()
    if case == "matches no module":  # a LoRA for another model: diffusers warns and generates without it
        tensors = {k.replace("unet.down_blocks.", "unet.down_blocks_of_another_model."): v for k, v in tensors.items()}
    elif case == "text-encoder keys only":
        tensors = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 64),
                   "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(64, 2)}
    else:
        tensors = {}
    lora = _write(tmp_path / "lora.safetensors", tensors, meta)
    _refused(command, lora, tmp_path, str(lora))


@pytest.mark.parametrize("command", COMMANDS)
def test_a_folder_with_two_loras_and_no_diffusers_file_is_refused_not_guessed(command, tmp_path):
    folder = tmp_path / "loras"
    _kohya(folder / "a.safetensors")
    _kohya(folder / "b.safetensors")
    _refused(command, folder, tmp_path, str(folder), "a.safetensors, b.safetensors")


def test_generate_leaves_text_encoder_keys_and_per_module_scales_to_diffusers(tmp_path):
    """What diffusers' loader applies itself does not make generate refuse a file that the strict reader (export,
    merge: UNet only, one scale) refuses; the UNet part is still placed strictly."""
    tensors, _ = _style()
    text_encoder = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 64),
                    "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(64, 2)}
    modules, _ = export.read_lora(STYLE, UNET_CONFIG)
    with_te = _write(tmp_path / "te.safetensors", {**formats.to_kohya_keys(modules), **text_encoder})
    patterns = _write(tmp_path / "patterns.safetensors", tensors, {formats.DIFFUSERS_ADAPTER_METADATA: json.dumps(
        {"unet.r": 4, "unet.lora_alpha": 4, "unet.alpha_pattern": {"down_blocks.0.resnets.0.conv1": 8}})})
    for lora, reason in ((with_te, "text-encoder keys"), (patterns, "different scales")):
        assert export.check_lora_for_diffusers(lora, UNET_CONFIG) == lora
        with pytest.raises(formats.LoraFormatError, match=reason):
            export.read_lora(lora, UNET_CONFIG)
    text_encoder["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"] = torch.tensor(float("nan"))
    _write(with_te, {**formats.to_kohya_keys(modules), **text_encoder})
    with pytest.raises(formats.LoraFormatError, match=r"te.safetensors: non-finite .* in lora_te_text_model_"):
        export.check_lora_for_diffusers(with_te, UNET_CONFIG)
    # A file diffusers' loader chokes on (text-encoder keys it cannot place: an IndexError inside diffusers 0.42)
    # is a one-line error naming the file, not a traceback.
    junk = _write(tmp_path / "junk-te.safetensors", {**tensors, **{
        "text_encoder.text_model.encoder.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
        "text_encoder.text_model.encoder.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)}})
    _refused("generate", junk, tmp_path, str(junk), "load_lora_weights failed")


def test_loras_from_elsewhere_still_work_and_unread_kohya_metadata_is_ignored(tmp_path):
    """The bundled style LoRA and a kohya file whose ss_network_* metadata is junk (no command reads it: the tensors'
    own alphas are the scale) generate, export and merge as before."""
    kohya = _kohya(tmp_path / "kohya.safetensors", {"ss_network_alpha": "lots", "ss_network_dim": "-1"})
    generate_main(_generate("style-dusk", tmp_path / "gen"))
    generate_main(_generate(kohya, tmp_path / "gen-kohya"))
    assert (tmp_path / "gen" / "grid.png").is_file() and (tmp_path / "gen-kohya" / "grid.png").is_file()
    export_main(_export(kohya, tmp_path / "exported", "--formats", "kohya"))
    rank = next(iter(export.read_lora(STYLE, UNET_CONFIG)[0].values())).rank
    exported = export.read_metadata(tmp_path / "exported" / "lcm-lora-teacher-eps.safetensors")
    assert exported["ss_network_dim"] == str(rank)
    merge_main(_merge(kohya, tmp_path / "merged.safetensors"))
    assert (tmp_path / "merged.safetensors").is_file()


# -- 2. non-finite values -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("keys", ["diffusers", "kohya"])
def test_a_lora_with_nan_or_inf_is_refused_naming_the_key(command, keys, tmp_path):
    if keys == "diffusers":
        tensors, meta = _style()
        tensors[A_KEY] = tensors[A_KEY].clone()
        tensors[A_KEY][0, 0] = float("nan")
        lora, key = _write(tmp_path / "nan.safetensors", tensors, meta), A_KEY
    else:
        lora = _kohya(tmp_path / "nan.safetensors")
        tensors, meta = export.read_safetensors(lora)
        key = "lora_unet_down_blocks_1_attentions_0_proj_in.alpha"
        tensors[key] = torch.tensor(float("inf"))
        _write(lora, tensors, meta)
    _refused(command, lora, tmp_path, str(lora), key, "non-finite")


def test_write_formats_writes_nothing_non_finite(tmp_path):
    """The trainer's export path: a NaN LoRA, or one whose values overflow fp16, raises and leaves no file."""
    modules, _ = export.read_lora(STYLE, UNET_CONFIG)
    info = export.ExportInfo(config_flat={}, teacher="teacher-eps", prediction_type="epsilon", steps=1,
                             unet_config=UNET_CONFIG, output_name="lcm-lora-x")
    path = "down_blocks.1.attentions.0.proj_in"
    for value, dtype, needles in ((float("nan"), torch.float32, ()), (1e6, torch.float16, ("overflow",))):
        up = modules[path].up.clone()
        up[0, 0] = value
        bad = {**modules, path: formats.LoraModule(modules[path].down, up, modules[path].alpha)}
        with pytest.raises(formats.LoraFormatError) as err:
            export.write_formats(bad, tmp_path, ["diffusers", "kohya", "peft"], dtype, info)
        for needle in (str(tmp_path / export.DIFFUSERS_WEIGHT_NAME), f"{formats.kohya_stem(path)}.lora_up.weight",
                       *needles):
            assert needle in str(err.value), (needle, str(err.value))
        assert not any(tmp_path.iterdir())


def test_merge_refuses_a_non_finite_strength_or_result(tmp_path):
    with pytest.raises(SystemExit, match="--strength nan: must be a finite number"):
        merge_main(_merge(STYLE, tmp_path / "merged.safetensors", "--strength", "nan"))
    half = _write(tmp_path / "half.safetensors",
                  {k: v.half() for k, v in export.read_safetensors(COMMUNITY)[0].items()})
    with pytest.raises(SystemExit, match=r"\.weight: the merged weight is not finite in torch.float16"):
        merge_main(["--checkpoint", str(half), "--lora", str(STYLE), "--output", str(tmp_path / "merged.safetensors"),
                    "--single_file_config", "teacher-eps", "--strength", "1e9"])
    assert not (tmp_path / "merged.safetensors").exists()


# -- 3. hostile metadata: one line naming the file and the key, never an AttributeError or ZeroDivisionError ---------

def _with_meta(tmp_path, key: str, value: str):
    tensors, meta = _style()
    return _write(tmp_path / "hostile.safetensors", tensors, {**meta, key: value})


@pytest.mark.parametrize("key, value", [
    ("lcm_lora.num_ddim_timesteps", "0"), ("lcm_lora.num_ddim_timesteps", "abc"),
    ("lcm_lora.num_ddim_timesteps", "2.5"),
    ("lcm_lora.timestep_scaling_factor", "fast"), ("lcm_lora.timestep_scaling_factor", "nan"),
])
def test_a_bad_sampling_grid_in_the_metadata_is_named(key, value, tmp_path):
    lora = _with_meta(tmp_path, key, value)
    _refused("generate", lora, tmp_path, str(lora), key, repr(value))
    with pytest.raises(formats.LoraFormatError, match=key):
        export.lcm_scheduler_settings(lora)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("value", [
    "[1, 2]", "not json", '{"unet.r": 0}', '{"r": "four"}', '{"unet.r": 4, "unet.lora_alpha": "inf"}',
    '{"unet.r": 4, "unet.rank_pattern": [4]}', '{"unet.r": 4, "unet.alpha_pattern": {"to_q": 0}}',
    '{"unet.r": 4, "text_encoder.r": -1}',
])
def test_bad_diffusers_adapter_metadata_is_named(command, value, tmp_path):
    lora = _with_meta(tmp_path, formats.DIFFUSERS_ADAPTER_METADATA, value)
    _refused(command, lora, tmp_path, str(lora), formats.DIFFUSERS_ADAPTER_METADATA)


@pytest.mark.parametrize("key, value, needle", [
    ("lcm_lora.config", "[1]", "lcm_lora.config"),
    ("lcm_lora.config", "{not json", "lcm_lora.config"),
    ("lcm_lora.config", json.dumps({"resolution": "big"}), "resolution"),
    ("lcm_lora.config", json.dumps({"resolution": 0}), "resolution"),
    ("lcm_lora.config", json.dumps({"num_ddim_timesteps": -3}), "num_ddim_timesteps"),
    ("lcm_lora.config", json.dumps({"export_dtype": "fp64"}), "export_dtype"),
    ("lcm_lora.config", json.dumps({"export_formats": ["zip"]}), "export_formats"),
    ("lcm_lora.config", json.dumps({"output_name": "../escaped"}), "output_name"),
    ("lcm_lora.steps_trained", "many", "lcm_lora.steps_trained"),
    ("lcm_lora.prediction_type", "noise", "lcm_lora.prediction_type"),
])
def test_a_bad_run_record_in_the_metadata_is_named_by_export(key, value, needle, tmp_path):
    lora = _with_meta(tmp_path / "in", key, value)
    _refused("export", lora, tmp_path, str(lora), needle)
    assert not (tmp_path / "escaped.safetensors").exists()


def _checkpoint(tmp_path, config_yaml: str):
    """A training checkpoint: checkpoint-3/lora_peft.safetensors (PEFT names, unscaled) and the run's config.yaml."""
    tensors, _ = _style()
    folder = tmp_path / "run" / "checkpoint-3"
    _write(folder / export.LORA_CHECKPOINT_NAME, {k.removeprefix("unet."): v for k, v in tensors.items()})
    (tmp_path / "run" / "config.yaml").write_text(config_yaml)
    return folder


@pytest.mark.parametrize("config_yaml, needle", [
    ("- a\n- list\n", "expected a mapping"),
    ("lora_rank: [4\n", "not a readable YAML config"),
    ("lora_alpha: 4\n", "lora_rank missing"),
    ("lora_rank: 0\nlora_alpha: 4\n", "lora_rank"),
    ("lora_rank: 4\nlora_alpha: abc\n", "lora_alpha"),
    ("lora_rank: 4\nlora_alpha: .nan\n", "lora_alpha"),
])
def test_a_bad_checkpoint_config_is_named_by_export(config_yaml, needle, tmp_path):
    checkpoint = _checkpoint(tmp_path, config_yaml)
    _refused("export", checkpoint, tmp_path, str(tmp_path / "run" / "config.yaml"), needle)


def test_a_good_checkpoint_config_exports(tmp_path):
    checkpoint = _checkpoint(tmp_path, "lora_rank: 4\nlora_alpha: 4\npretrained_teacher_model: teacher-eps\n")
    export_main(_export(checkpoint, tmp_path / "exported", "--formats", "diffusers", "--dtype", "fp32"))
    assert export.read_metadata(tmp_path / "exported" / export.DIFFUSERS_WEIGHT_NAME)["lcm_lora.steps_trained"] == "3"


# -- 4. an output is never one of the command's inputs, whatever --overwrite says -----------------------------------

def _run_folder(tmp_path):
    """A training output folder: config.yaml, the diffusers file and the kohya file."""
    run = tmp_path / "run"
    _write(run / export.DIFFUSERS_WEIGHT_NAME, *_style())
    _kohya(run / "lcm-lora-run.safetensors")
    (run / "config.yaml").write_text("pretrained_teacher_model: teacher-eps\noutput_name: lcm-lora-run\n"
                                     "lora_rank: 4\nlora_alpha: 4\n")
    return run


def _snapshot(folder) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_merge_never_writes_over_its_lora(tmp_path):
    lora = _write(tmp_path / "lora" / export.DIFFUSERS_WEIGHT_NAME, *_style())
    (tmp_path / "link.safetensors").symlink_to(lora)
    before = lora.read_bytes()
    for lora_arg, output in ((lora, lora), (lora.parent, lora), (lora, tmp_path / "link.safetensors")):
        with pytest.raises(SystemExit, match=f"error: {re.escape(str(output))} is an input of this command"):
            merge_main(_merge(lora_arg, output, "--overwrite"))
        assert lora.read_bytes() == before


def test_export_never_rewrites_its_source(tmp_path):
    run = _run_folder(tmp_path)
    lone = _kohya(tmp_path / "lone" / "lcm-lora-teacher-eps.safetensors")
    before = {**_snapshot(run), **_snapshot(lone.parent)}
    for source, out in ((run, run), (lone, lone.parent)):
        with pytest.raises(SystemExit, match="an input of this command"):
            export_main(_export(source, out, "--overwrite"))
    assert {**_snapshot(run), **_snapshot(lone.parent)} == before


def test_an_output_name_that_makes_two_formats_one_file_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="the kohya file would be the diffusers file"):
        export_main(_export(STYLE, tmp_path / "out", "--formats", "diffusers", "kohya",
                            "--output_name", "pytorch_lora_weights"))
    assert not (tmp_path / "out").exists()


# -- 5. an existing file is replaced only with --overwrite -----------------------------------------------------------

@pytest.mark.parametrize("command, existing", [
    ("export", f"exported/{export.DIFFUSERS_WEIGHT_NAME}"), ("merge", "merged.safetensors"),
    ("generate", "gen/grid.png"),
])
def test_an_existing_file_is_replaced_only_with_overwrite(command, existing, tmp_path):
    main, args, out = COMMANDS[command]
    target = tmp_path / existing
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"the user's own file")
    with pytest.raises(SystemExit, match=f"error: {re.escape(str(target))} exists: pass --overwrite"):
        main(args(STYLE, tmp_path / out))
    assert target.read_bytes() == b"the user's own file"
    assert [p for p in (tmp_path / out).parent.rglob("*") if p.is_file()] == [target]  # nothing else written
    main(args(STYLE, tmp_path / out, "--overwrite"))
    assert target.read_bytes() != b"the user's own file"
    assert not [p for p in tmp_path.rglob(".*tmp-*")]  # written atomically: no temporary left
