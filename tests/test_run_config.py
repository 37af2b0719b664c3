"""The typed settings (dreambooth/run_config.py): one frozen group per flag group, built by validate() without
touching the parsed flags; the recipe built and stepped from them directly, without main()."""
import copy
import dataclasses
import inspect
import os
import re

import pytest

from conftest import train_args
from dreambooth import run_config
from dreambooth.config import build_parser, parse_args, recipe_yaml, validate


def test_every_flag_is_in_exactly_one_group_named_as_the_parser_groups_it():
    """--help's groups and the dataclasses are the same sets of flags, so a new flag cannot be left out of the
    typed settings (RunConfig.build would fail on it) nor typed into the wrong group."""
    from dreambooth.families import FAMILIES
    parser = build_parser()
    family_flags = {f for family in FAMILIES for f in family.flags}
    seen, own = [], []
    for group in parser._action_groups:
        dests = [a.dest for a in group._group_actions]
        if group.title in run_config.GROUPS:
            name, klass = run_config.GROUPS[group.title]
            assert dests == [f.name for f in dataclasses.fields(klass)], group.title
            assert name in {f.name for f in dataclasses.fields(run_config.RunConfig)}
            seen += dests
        elif group.title.startswith("model-family flags"):  # SD 3's and Flux's own: RunConfig.family_options
            own += dests
        else:  # how flags are given, and diffusers' flags that validate() refuses
            assert set(dests) <= set(run_config.NOT_SETTINGS), group.title
    assert set(own) <= family_flags and not set(own) & set(seen)
    assert len(seen) == len(set(seen)) == len({a.dest for a in parser._actions} - set(run_config.NOT_SETTINGS)
                                              - set(own))


def test_validate_resolves_into_frozen_groups_and_leaves_the_flags_as_parsed(tiny_model, instance_dir, tmp_path):
    """What validate() decides (the family's defaults, fp16 on a CPU-only machine, the resume folder) is in the
    record it returns; the namespace the caller parsed is the same after as before."""
    out = tmp_path / "o"
    os.makedirs(out / "checkpoint-2")
    args = parse_args(["--pretrained_model_name_or_path", tiny_model["sd3"], "--instance_data_dir", instance_dir,
                       "--instance_prompt", "a photo of sks dog", "--output_dir", str(out), "--mixed_precision", "fp16",
                       "--use_8bit_adam", "--resume_from_checkpoint", "latest"])
    before = copy.deepcopy(vars(args))
    with pytest.raises(Exception):  # the empty checkpoint folder is refused: validate stops half-way ...
        validate(args, warn=lambda note: None)
    assert vars(args) == before  # ... and still changed nothing
    os.rmdir(out / "checkpoint-2")
    notes = []
    run = validate(args, warn=notes.append)
    assert vars(args) == before
    assert (args.resolution, args.learning_rate, args.lora_target_modules, args.weighting_scheme) == (None,) * 4
    assert run.family.name == "SD 3" and run.data.resolution == 512 and run.optimizer.learning_rate == 1e-4
    assert run.optimizer.optimizer == "adamw8bit"
    assert run.training.mixed_precision == ("fp16" if __import__("torch").cuda.is_available() else "no")
    assert run.outputs.resume_from_checkpoint is None  # 'latest' with no checkpoint: a fresh start
    assert dict(run.family_options)["weighting_scheme"] == "logit_normal" and "guidance_scale" not in run.family_options
    assert run.value("guidance_scale") is None and run.value("max_sequence_length") == 77
    assert run.lora.lora_target_modules.split(",")[:2] == ["attn.add_k_proj", "attn.add_q_proj"]
    assert run.instance_images == tuple(sorted(run.instance_images)) and len(run.instance_images) == 3
    assert run.checkpoint_settings["optimizer"] == "adamw8bit" and run.quantization is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.data.resolution = 64
    with pytest.raises(TypeError):
        run.family_options["weighting_scheme"] = "none"
    # config.yaml: the flags as asked, what this run decided as comments (and the run record's precision)
    text = recipe_yaml(run, run_config.RunRecord(mixed_precision="no", cache_latents=True))
    assert "\nresolution: null\n" in text and "\n#   resolution: 512\n" in text
    assert "\n#   cache_latents: true\n" in text and "\nmixed_precision: fp16\n" in text
    assert "resume_from_checkpoint" not in text and "hub_token" not in text


def test_the_recipe_reads_settings_not_flags():
    """After validate() nothing reads the parsed flags: the recipe class and the output writers never mention
    them (the one place is _main, where validate() turns them into the typed settings)."""
    import train_dreambooth_lora
    from dreambooth import report
    flags = re.compile(r"\bargs\b")
    assert not flags.findall(inspect.getsource(train_dreambooth_lora.DreamBoothRecipe))
    for name in ("write_run_files", "model_card", "pivotal_usage", "prior_text", "base_weights_text",
                 "objective_text", "training_metadata"):
        assert not flags.findall(inspect.getsource(getattr(report, name))), name
    setups = [n for n in vars(train_dreambooth_lora.DreamBoothRecipe) if n.startswith("_setup_")]
    assert len(setups) == 9
    for name in setups:  # each step gets its own settings, never the whole RunConfig
        params = inspect.signature(getattr(train_dreambooth_lora.DreamBoothRecipe, name)).parameters
        assert "run" not in params and "args" not in params, name


def test_recipe_builds_and_steps_without_main(tiny_model, instance_dir, tmp_path):
    """The recipe as a component: built from a RunConfig, set up, stepped and finished in process, no main()."""
    from train_dreambooth_lora import DreamBoothRecipe
    from dreambooth.report import RunStats
    out = tmp_path / "o"
    args = parse_args(train_args(tiny_model["eps"], instance_dir, str(out), "--max_train_steps", "2",
                                 "--rank", "2", "--report_to", "none", "--center_crop", "--checkpointing_steps", "2"))
    run = validate(args, warn=lambda note: None)
    record = run_config.RunRecord()
    recipe = DreamBoothRecipe(run, record, RunStats())
    try:
        recipe.setup()
        assert recipe.max_train_steps == 2 and len(recipe.dataset.instance_paths) == 3
        assert recipe.train() == 0
        assert recipe.position.step == 2 and [s for s, _ in recipe.reader.history] == [1, 2]
        assert all(0 < loss < 10 for _, loss in recipe.reader.history)
        assert recipe.finish() == 0
    finally:
        recipe.cleanup()
    # what the run decided is in its record, not in the flags; the files are written from it
    assert record == run_config.RunRecord(mixed_precision="no", pre_compute_text_embeddings=True, cache_latents=True)
    assert args.cache_latents is None and args.pre_compute_text_embeddings is None and args.mixed_precision is None
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors") and os.path.isdir(out / "checkpoint-2")
    assert "\n#   cache_latents: true\n" in (out / "config.yaml").read_text()
    assert "| mixed precision | no |" in (out / "README.md").read_text()
