"""Checks that look at what a run really uses: the caption files (in any case, kohya's .caption too), the prompts
as the tokenizers cut them, pivotal tuning's trigger in the captions, and a VAE from the same latent space. Each
fails in one line before the model loads where the tokenizer or a config.json can tell. --tokenizer_max_length
and --text_encoder_use_attention_mask reach the text encoder."""
import json
import shutil

import pytest
import torch

from conftest import draw_subject
from dreambooth import config, images, priors


@pytest.fixture
def captioned(tmp_path):
    """Three photos, each with a caption file: (folder, write(name, text))."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        draw_subject(folder / f"dog{i}.png", shift=i * 3)

    def write(name, text):
        (folder / name).write_text(text, encoding="utf-8")
    return str(folder), write


def _notes(tiny_model, key, *flags):
    """validate()'s notes for a run on a tiny model (nothing loads: validate reads files only)."""
    notes = []
    args = config.parse_args(["--pretrained_model_name_or_path", tiny_model[key], "--instance_prompt",
                              "a photo of sks dog", "--output_dir", "/tmp/never-written", "--resolution", "64",
                              *[str(f) for f in flags]])
    config.validate(args, warn=notes.append)
    return notes


def test_captions_in_any_case_and_kohyas_extension_are_read(captioned):
    folder, write = captioned
    write("dog0.TXT", "a photo of sks dog on grass")  # a Windows tool's upper case
    write("dog1.caption", "sks dog, studio")  # kohya's default caption extension
    found = images.check_captions(images.list_images(folder))
    assert found == {f"{folder}/dog0.png": "a photo of sks dog on grass", f"{folder}/dog1.png": "sks dog, studio"}
    assert images.list_instance_images(folder) == ([f"{folder}/dog{i}.png" for i in range(3)], 0,
                                                   [f"{folder}/dog0.TXT", f"{folder}/dog1.caption"])


def test_two_captions_for_one_photo_are_refused(captioned, fails):
    folder, write = captioned
    write("dog0.txt", "one")
    write("dog0.caption", "two")
    assert fails("eps", "--instance_data_dir", folder) == (
        f"--instance_data_dir: caption files {folder}/dog0.caption and dog0.txt both belong to dog0.png; keep one of "
        "them")


def test_pivotal_trigger_only_in_the_unused_instance_prompt_is_said(captioned, tiny_model):
    """Every photo has a caption, so --instance_prompt (which has TOK) trains nothing: the check read it anyway."""
    folder, write = captioned
    for i in range(3):
        write(f"dog{i}.txt", "a photo of a dog")
    notes = _notes(tiny_model, "eps", "--instance_data_dir", folder, "--train_text_encoder_ti",
                   "--instance_prompt", "a photo of TOK dog")
    assert ("warning: --token_abstraction TOK: every photo has a caption file and none has the word "
            "(--instance_prompt, which has it, is used only for photos without one), so its new tokens will not "
            "train (the LoRA still does); put TOK in the captions") in notes
    write("dog2.txt", "a photo of TOK dog")  # one caption names it: its rows train, the other photos' do not
    assert [n for n in _notes(tiny_model, "eps", "--instance_data_dir", folder, "--train_text_encoder_ti",
                              "--instance_prompt", "a photo of TOK dog") if "TOK" in n] == [
        "warning: --token_abstraction TOK: 2 prompt(s) that train lack the word (dog0.txt, dog1.txt), so those photos "
        "train without its new tokens; name the subject with TOK in each"]


def test_a_trigger_past_the_77_token_cut_is_refused(captioned, fails, tiny_model):
    folder, write = captioned
    write("dog1.txt", "a photo of " + "very " * 90 + "TOK dog")
    assert fails("eps", "--instance_data_dir", folder, "--train_text_encoder_ti").startswith(
        f"caption file {folder}/dog1.txt: the new tokens of TOK fall past the 77 tokens text_encoder reads (")
    assert fails("eps", "--instance_data_dir", folder, "--train_text_encoder_ti").endswith(
        "so they would not train on it; shorten it or move TOK nearer the start")
    # SD 3: the same for both CLIP encoders, which get the new rows
    assert fails("sd3", "--instance_data_dir", folder, "--train_text_encoder_ti").startswith(
        f"caption file {folder}/dog1.txt: the new tokens of TOK fall past the 77 tokens text_encoder reads (")


def test_long_prompts_are_noted_with_where_the_cut_falls(captioned, tiny_model):
    folder, write = captioned
    write("dog0.txt", "a photo of sks dog " + "and more words " * 40)
    notes = _notes(tiny_model, "eps", "--instance_data_dir", folder)
    cut = [n for n in notes if "longer than" in n]
    assert len(cut) == 1 and cut[0].startswith("note: 1 prompt(s) are longer than the 77 tokens the text encoder "
                                               "reads; the words after '")
    assert cut[0].endswith(f"are not trained on (e.g. caption file {folder}/dog0.txt); shorten them")
    # Flux: T5 reads --max_sequence_length tokens, CLIP's cut at 77 is by design: a prompt under 512 is not cut
    assert not [n for n in _notes(tiny_model, "flux", "--instance_data_dir", folder) if "longer than" in n]


@pytest.mark.parametrize("flags,line", [
    (["--tokenizer_max_length", "200"],
     "--tokenizer_max_length 200 is more than the 77 positions the model's text_encoder has; use 77 or less (or "
     "leave it out: the tokenizer's own length)"),
    (["--train_text_encoder_ti", "--num_new_tokens_per_abstraction", "1000000"],
     "--num_new_tokens_per_abstraction 1000000 cannot fit in a prompt: CLIP reads 75 tokens besides its start and "
     "end; use 1-4 (diffusers' default is 2)"),
])
def test_lengths_no_model_can_take(fails, flags, line):
    """Before: an internal error mid-run (200 positions asked of a 77-position table) and a hang after load (a
    million tokens added to the tokenizer)."""
    assert fails("eps", *flags) == line


def test_a_vae_of_another_family_is_refused(fails, tiny_model, instance_dir, tmp_path):
    """An SD 1.x VAE (scaling 0.18215) on SDXL (0.13025) loads and trains, in the wrong latent space: refused from
    the config.json before the load, and at the load where the base is a single file."""
    vae = tmp_path / "sdxl-vae"
    shutil.copytree(f"{tiny_model['eps']}/vae", vae)
    cfg = json.loads((vae / "config.json").read_text())
    cfg["scaling_factor"] = 0.13025
    (vae / "config.json").write_text(json.dumps(cfg))
    line = (f"--pretrained_vae_model_name_or_path {vae} is a VAE for another model family: scaling_factor 0.13025 "
            "(the base's: 0.18215); give a VAE made for SD 1.x/2.x bases, or leave the flag out to use the base's own")
    assert fails("eps", "--pretrained_vae_model_name_or_path", str(vae)) == line
    assert fails("single", "--single_file_config", tiny_model["eps"], "--pretrained_vae_model_name_or_path",
                 str(vae)) == line
    # the base's own VAE is accepted (the check compares latent spaces, not files)
    assert _notes(tiny_model, "eps", "--pretrained_vae_model_name_or_path", f"{tiny_model['eps']}/vae",
                  "--instance_data_dir", instance_dir) == []


def test_the_class_image_cache_key_includes_the_vae_revision_and_variant():
    plain = priors.prior_settings("m", "a photo of dog", 25, 0, 64, "float32")
    assert priors.prior_settings("m", "a photo of dog", 25, 0, 64, "float32", {"vae": None, "revision": None}) == plain
    keys = {priors.prior_settings("m", "a photo of dog", 25, 0, 64, "float32", extra)[1]
            for extra in ({"vae": "sd-vae-ft-mse"}, {"vae": "other-vae"}, {"revision": "fp16"}, {"variant": "fp16"})}
    assert len(keys) == 4 and plain[1] not in keys


def test_infer_says_where_a_long_prompt_is_cut(tiny_model, tmp_path, capsys):
    """diffusers cuts at 77 tokens with a logged warning that quiet logging hides: infer.py says it in one note."""
    import infer
    prompt = "a photo of sks dog " + "and more words " * 40
    assert infer.main(["--base", tiny_model["eps"], "--prompt", prompt, "--num_images", "1", "--steps", "1",
                       "--output", str(tmp_path / "out")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "longer than" in line]
    assert len(notes) == 1 and notes[0].startswith(
        "infer.py: note: 1 prompt(s) are longer than the 77 tokens the text encoder reads; the words after '")
    assert notes[0].endswith(f"' are ignored (e.g. --prompt '{prompt}'); shorten them")


@pytest.mark.parametrize("flags,line", [
    (["--max_train_steps", "99999999999999999999"],
     "--max_train_steps 99999999999999999999 is more than 1,000,000,000, the most this trainer takes; use a smaller "
     "value"),
    (["--repeats", "1000000000"], "--repeats 1000000000 is more than 10,000, the most this trainer takes; use a "
                                  "smaller value"),
    (["--rank", "100000"], "--rank 100000 is more than 4,096, the most this trainer takes; use a smaller value"),
    (["--pretrained_vae_model_name_or_path", "/nonexistent/vae"],
     "--pretrained_vae_model_name_or_path /nonexistent/vae: folder does not exist; give a VAE folder (with "
     "config.json, or a model folder with vae/) or a hub id such as madebyollin/sdxl-vae-fp16-fix"),
])
def test_counts_and_paths_no_run_can_use(fails, flags, line):
    """Before: an OverflowError reported as a bug, memory filling for minutes, the kernel's OOM kill with no
    line, and an offline-cache hint for a folder that does not exist."""
    assert fails("eps", *flags) == line


def test_photos_given_as_a_file_and_a_vae_that_is_not_one(fails, instance_dir, tmp_path):
    photo = f"{instance_dir}/dog0.png"
    assert fails("eps", "--instance_data_dir", photo) == (
        f"--instance_data_dir {photo} is a file; give the folder that holds the photos")
    assert fails("eps", "--pretrained_vae_model_name_or_path", instance_dir) == (
        f"--pretrained_vae_model_name_or_path {instance_dir} is not a VAE folder (no config.json, no vae/); give the "
        "folder that holds the VAE's config.json and weights")


def test_pivotal_flags_without_pivotal_tuning_and_captions_without_the_trigger_are_said(captioned, tiny_model):
    folder, write = captioned
    write("dog0.txt", "a photo of TOK dog on grass")
    write("dog1.caption", "a photo of TOK dog")
    write("dog2.TXT", "a photo of a dog")
    notes = _notes(tiny_model, "eps", "--instance_data_dir", folder, "--train_text_encoder_ti")
    assert ("warning: --token_abstraction TOK: 1 prompt(s) that train lack the word (dog2.TXT), so those photos train "
            "without its new tokens; name the subject with TOK in each") in notes
    notes = _notes(tiny_model, "eps", "--instance_data_dir", folder, "--token_abstraction", "OBJ",
                   "--num_new_tokens_per_abstraction", "3")
    assert ("warning: --token_abstraction and --num_new_tokens_per_abstraction are ignored without "
            "--train_text_encoder_ti (pivotal tuning); add it, or drop them") in notes


def test_a_fresh_run_into_an_unfinished_runs_checkpoints_is_refused(tiny_model, instance_dir, tmp_path, capsys):
    """Before: the new run wrote its checkpoints over the killed run's, kept its later ones, and a later 'latest'
    resumed the old run's state on top of the new one. A file that is not a LoRA at our file's name is not 'a
    finished run' to replace: it is refused as foreign."""
    import train_dreambooth_lora
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "lora_settings.json").write_text("{}")
    argv = ["--pretrained_model_name_or_path", tiny_model["eps"], "--instance_data_dir", instance_dir,
            "--instance_prompt", "a photo of sks dog", "--output_dir", str(out), "--resolution", "64"]
    assert train_dreambooth_lora.main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"train_dreambooth_lora.py: error: --output_dir {out} holds the checkpoints of an unfinished run (up to "
        "checkpoint-3); continue it with --resume_from_checkpoint latest, add --overwrite_output_dir to start again, "
        "or choose another folder")
    shutil.rmtree(out / "checkpoint-3")
    (out / "pytorch_lora_weights.safetensors").write_text("notours")
    assert train_dreambooth_lora.main(argv + ["--overwrite_output_dir"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"train_dreambooth_lora.py: error: --output_dir {out} holds pytorch_lora_weights.safetensors, not written by "
        "this trainer, which the run would replace with its own LoRA weights; move it out of the folder or choose "
        "another --output_dir")
    assert (out / "pytorch_lora_weights.safetensors").read_text() == "notours"


def test_tokenizer_max_length_and_attention_mask_reach_the_text_encoder():
    """diffusers' --tokenizer_max_length and --text_encoder_use_attention_mask: shorter token rows, and a padding
    mask that changes what the padded positions see (SD's CLIP is trained without one, hence off by default)."""
    from dreambooth.families import PromptEncoder, StableDiffusion
    from make_tiny_model import build_tiny_pipeline
    family = StableDiffusion.from_pipeline(build_tiny_pipeline())
    batch = {"prompt_ids": torch.tensor([0, 1])}
    short = PromptEncoder(family, ["a photo of sks dog", "a dog"], max_length=20)
    assert short.tokens[0]["input_ids"].shape == (2, 20)
    with torch.no_grad():
        plain = short.conditioning(batch)["encoder_hidden_states"]
        masked = PromptEncoder(family, ["a photo of sks dog", "a dog"], max_length=20,
                               use_attention_mask=True).conditioning(batch)["encoder_hidden_states"]
        default = PromptEncoder(family, ["a dog"]).conditioning({"prompt_ids": torch.tensor([0])})
    assert plain.shape == masked.shape == (2, 20, 32) and default["encoder_hidden_states"].shape == (1, 77, 32)
    assert not torch.allclose(plain, masked)

