"""dreambooth/config.py's parser: config files (YAML/TOML) read like the command line and replayable, paths with ~
and $VARS expanded, the shipped recipes parse, every flag documented in docs/flags.md, and --help's opening lines.
A value the parser refuses is one line naming the config file and the key; no model is loaded here except where a
case goes through main() with the tiny SD model's folder."""
import os

import pytest

from conftest import fails_with
from dreambooth.config import UsageError, effective_config, parse_args


def test_config_file_values_go_through_the_parser(world, capsys):
    """A config file is read like the command line: "false" is false, 4.5 is no int, choices and NaN refused, and
    every on/off flag can be turned off again on the command line."""
    from dreambooth.config import parse_args
    tmp_path, dog, out, argv = world
    config = tmp_path / "c.yaml"
    config.write_text('center_crop: "false"\nrandom_flip: "yes"\ncache_latents: true\nrank: 8\n'
                      'lora_target_modules: [to_q, to_v]\nclass_data_dir: ~/classes\n')
    args = parse_args(argv("--config", config, "--no-cache_latents"))
    assert (args.center_crop, args.random_flip, args.cache_latents, args.rank) == (False, True, False, 8)
    assert args.lora_target_modules == "to_q,to_v" and args.class_data_dir == os.path.expanduser("~/classes")
    for text, line in [("rank: 4.5\n", "argument --rank: invalid int value: '4.5'"),
                       ("lr_scheduler: cosine_annealing\n", "argument --lr_scheduler: invalid choice: "
                        "'cosine_annealing' (choose from 'linear', 'cosine', 'cosine_with_restarts', 'polynomial', "
                        "'constant', 'constant_with_warmup')"),
                       ("learning_rate: .nan\n", "argument --learning_rate: nan is not a finite number"),
                       ("center_crop: maybe\n", "center_crop: expected true or false, got 'maybe'"),
                       ("instance_prompt: [a, b]\n", "instance_prompt: expected one value, got list ['a', 'b']"),
                       ("learning_rat: 1\n", "unknown key 'learning_rat' (keys are flag names without --)")]:
        config.write_text(text)
        fails_with(world, capsys, f"--config {config}: {line}", "--config", config)


def test_paths_expand_user_and_variables(world, monkeypatch):
    from dreambooth.config import parse_args
    tmp_path, dog, out, argv = world
    monkeypatch.setenv("DOGS", str(dog))
    monkeypatch.setenv("HOME", str(tmp_path))
    args = parse_args(argv(instance_data_dir="$DOGS", output_dir="~/runs/x"))
    assert args.instance_data_dir == str(dog) and args.output_dir == str(tmp_path / "runs" / "x")



def test_config_file_precedence_and_replay(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: 3.0e-4\nrank: 8\nlora_target_modules: [to_q, to_v]\n"
                                     "instance_prompt: a photo of sks cat\n")
    args = parse_args(["--config", str(tmp_path / "c.yaml"), "--rank", "16"])
    assert args.learning_rate == 3e-4 and args.rank == 16 and args.lora_target_modules == "to_q,to_v"
    (tmp_path / "c.toml").write_text('rank = 2\nwith_prior_preservation = true\n')
    args = parse_args([f"--config={tmp_path / 'c.toml'}"])
    assert args.rank == 2 and args.with_prior_preservation
    # the saved effective config replays to the same settings
    import yaml
    (tmp_path / "saved.yaml").write_text(yaml.safe_dump(effective_config(args)))
    assert effective_config(parse_args(["--config", str(tmp_path / "saved.yaml")])) == effective_config(args)
    with pytest.raises(UsageError, match="unknown key 'rnak'"):
        (tmp_path / "bad.yaml").write_text("rnak: 2\n")
        parse_args(["--config", str(tmp_path / "bad.yaml")])


def test_recipes_parse_and_every_flag_is_documented():
    from conftest import ROOT
    from dreambooth.config import build_parser
    recipes = os.path.join(ROOT, "examples", "recipes")
    names = sorted(os.listdir(recipes))
    assert {"sd15_dog.yaml", "sd21_768_dog.yaml", "sd15_no_prior.yaml", "sd15_text_encoder.yaml", "sdxl_dog.yaml",
            "toy_demo.yaml"} <= set(names)
    for name in names:
        args = parse_args(["--config", os.path.join(recipes, name)])
        assert args.output_dir.startswith("work_dirs/"), name
        assert args.instance_prompt == ("a sks circle" if name == "toy_demo.yaml" else "a photo of sks dog"), name
    assert parse_args(["--config", os.path.join(recipes, "sd21_768_dog.yaml")]).resolution == 768
    assert parse_args(["--config", os.path.join(recipes, "sdxl_dog.yaml")]).resolution == 1024
    from dreambooth.flagdoc import flags_markdown
    flags = open(os.path.join(ROOT, "docs", "flags.md"), encoding="utf-8").read()
    assert flags == flags_markdown(build_parser()), "docs/flags.md is stale: python -m dreambooth.flagdoc > docs/flags.md"
    for action in build_parser()._actions:
        if action.dest == "help":
            continue
        assert action.help and len(action.help) > 10, action.dest
        assert f"| `{action.option_strings[0]}` |" in flags, f"{action.option_strings[0]} missing from docs/flags.md"



def test_help_opens_with_purpose_example_and_required_flags_and_shows_each_default_once(capsys):
    from dreambooth.config import build_parser
    parser = build_parser()
    text = parser.format_help()
    head = text.split("options:")[0]
    assert head.startswith("usage: train_dreambooth_lora.py --pretrained_model_name_or_path MODEL "
                           "--instance_data_dir DIR --instance_prompt PROMPT [options]")
    assert "Teach a Stable Diffusion model one subject" in head and "accelerate launch train_dreambooth_lora.py" in head
    assert "required: --pretrained_model_name_or_path, --instance_data_dir (or --dataset_name), --instance_prompt" in head
    formatter = parser._get_formatter()
    for action in parser._actions:
        rendered = formatter._get_help_string(action) or ""
        assert rendered.lower().count("default") <= 1, (action.dest, rendered)
    assert ("Learning rate of the denoiser's LoRA (default: the family's, as diffusers' scripts: 5e-4 for SD 1.x/2.x "
            "and SDXL, 1e-4 for SD 3)." in " ".join(text.split()))

