"""evaluate.py: the DreamBooth paper's protocol, offline, with tiny random-weight DINO (ViT) and CLIP models."""
import json
import os

import pytest

from conftest import ROOT, run_main, run_script, train_args


def test_paper_prompt_lists():
    from dreambooth.evaluation import LIVE_PROMPTS, OBJECT_PROMPTS, paper_prompts, prompt_set_for, without_identifier

    assert len(OBJECT_PROMPTS) == len(LIVE_PROMPTS) == 25
    assert len(set(OBJECT_PROMPTS)) == len(set(LIVE_PROMPTS)) == 25
    # The two lists share the 10 recontextualisations first and the 5 property changes last (the paper's layout).
    assert OBJECT_PROMPTS[:10] == LIVE_PROMPTS[:10] and OBJECT_PROMPTS[-5:] == LIVE_PROMPTS[-5:]
    dog = paper_prompts("sks", "dog")
    assert prompt_set_for("dog") == "live" and "a sks dog wearing a santa hat" in dog
    assert "a sks dog floating in an ocean of milk" not in dog
    bag = paper_prompts("sks", "backpack")
    assert prompt_set_for("backpack") == "object" and "a sks backpack floating in an ocean of milk" in bag
    assert bag[0] == "a sks backpack in the jungle" and bag[-1] == "a cube shaped sks backpack"
    assert paper_prompts("zwx", "dog", "object")[13] == "a zwx dog floating on top of water"  # flag wins over class
    assert without_identifier("a red sks dog", "sks") == "a red dog"
    assert without_identifier("a sksy dog", "sks") == "a sksy dog"  # whole words only


def test_table_layout():
    from dreambooth.evaluation import format_table, mean_pairwise

    table = format_table([{"name": "real images", "DINO": 0.774, "CLIP-I": 0.885, "CLIP-T": None, "PRES": None,
                           "DIV": None},
                          {"name": "final", "DINO": 0.668, "CLIP-I": 0.803, "CLIP-T": 0.305, "PRES": 0.5, "DIV": 0.2}])
    lines = table.splitlines()
    assert lines[0] == "| model | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ | PRES ↓ | DIV ↑ |"
    assert lines[2] == "| real images | 0.774 | 0.885 | — | — | — |"
    assert lines[3] == "| final | 0.668 | 0.803 | 0.305 | 0.500 | 0.200 |"
    import torch
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    assert mean_pairwise(e) == pytest.approx(2 / 6)  # pairs (0,1) and (1,0) are 1, the other four 0
    assert mean_pairwise(e[:1]) is None


def test_bad_input_is_one_line(tmp_path, tiny_judges, instance_dir):
    r = run_script("evaluate.py", "--base", "x", "--real_dir", str(tmp_path / "missing"), "--class_name", "dog")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--real_dir" in r.stderr
    r = run_script("evaluate.py", "--base", "x", "--real_dir", instance_dir, "--class_name", "dog", "--checkpoints")
    assert r.returncode == 2 and "--checkpoints needs --lora" in r.stderr
    r = run_script("evaluate.py", "--base", "x", "--real_dir", instance_dir, "--class_name", "dog",
                   "--dino_model", "nobody/not-a-dino")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "--dino_model nobody/not-a-dino" in r.stderr and "HF_HUB_OFFLINE" in r.stderr
    assert not os.path.exists(os.path.join(ROOT, "eval"))  # the default --output: not made for a failed run


@pytest.mark.slow
def test_checkpoints_table_json_and_sheets(tmp_path, tiny_model, tiny_judges, instance_dir):
    """A 4-step run with checkpoints at 2 and 4, scored with --checkpoints --with_base: one row per model, the
    final LoRA scored exactly as checkpoint-4 (same weights, same seeds), the base differently."""
    run = tmp_path / "run"
    r = run_main(*train_args(tiny_model["eps"], instance_dir, str(run), "--max_train_steps",
                             "4", "--checkpointing_steps", "2", "--learning_rate", "5e-2", "--report_to", "none"))
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "eval"
    r = run_script("evaluate.py", "--base", tiny_model["eps"], "--lora", str(run), "--checkpoints", "--with_base",
                   "--real_dir", instance_dir, "--class_name", "dog", "--num_prompts", "2", "--num_images", "2",
                   "--num_class_images", "2", "--steps", "2", "--dino_model", tiny_judges["dino"],
                   "--clip_model", tiny_judges["clip"], "--output", str(out), "--no_progress")
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((out / "metrics.json").read_text())
    names = [row["name"] for row in data["results"]]
    assert names == ["real images", "base", "checkpoint-2", "checkpoint-4", "final"]
    assert data["settings"]["prompts"] == ["a sks dog in the jungle", "a sks dog in the snow"]
    assert data["settings"]["prompt_list"] == "live" and data["settings"]["class_prompt"] == "a dog"
    rows = {row["name"]: row for row in data["results"]}
    for name in names[1:]:
        for m in ("DINO", "CLIP-I", "CLIP-T", "PRES", "DIV"):
            assert -1.0 <= rows[name][m] <= 1.0, (name, m)
        assert len(rows[name]["per_prompt"]) == 2
        assert os.path.isfile(rows[name]["contact_sheet"])
    assert rows["final"]["DINO"] == pytest.approx(rows["checkpoint-4"]["DINO"], abs=1e-6)
    assert rows["final"]["CLIP-T"] == pytest.approx(rows["checkpoint-4"]["CLIP-T"], abs=1e-6)
    assert abs(rows["base"]["DINO"] - rows["final"]["DINO"]) > 1e-4  # the LoRA was applied (and unloaded after)
    assert [row["step"] for row in data["results"][2:]] == [2, 4, None]
    # The table printed is the one in the JSON, with a row per checkpoint.
    assert data["table"] in r.stdout
    assert "| checkpoint-2 |" in r.stdout and "| final |" in r.stdout
    from PIL import Image
    with Image.open(out / "contact_sheet_final.png") as sheet:
        assert sheet.size == (2 * 96, 3 * (96 + 12))  # 2 prompts + 1 class row, 2 images each


def test_every_flag_has_help_and_is_documented():
    from evaluate import build_parser

    readme = open(os.path.join(ROOT, "docs", "quality.md")).read()  # evaluate.py's section
    for action in build_parser()._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
        assert f"`{action.option_strings[0]}" in readme, f"{action.option_strings[0]} missing from docs/quality.md"
