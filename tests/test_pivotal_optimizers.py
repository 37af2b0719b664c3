"""Optimizer choice (--optimizer adamw|adamw8bit|prodigy) and pivotal tuning (--train_text_encoder_ti): the flags'
one-line errors, the new token rows training while every other row stays bit-identical, exact resume with each
optimizer across the pivot, and embeddings files that diffusers' load_textual_inversion, infer.py and the
ecosystem's key layouts read."""
import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_dreambooth_lora
from conftest import draw_subject, run_main, train_args
from dreambooth import pivotal
from dreambooth.config import parse_args

pytestmark = pytest.mark.filterwarnings("ignore")


# ---- flags (no model) ---------------------------------------------------------------------------------------
@pytest.fixture
def flags(world):
    """main() on conftest's world (tiny SD, two photos), the subject written as TOK."""
    _, dog, out, argv = world

    def run(*extra, prompt="a photo of TOK dog"):
        return train_dreambooth_lora.main(argv(*extra, instance_prompt=prompt))
    return run, out, dog


def one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("extra,message", [
    (["--optimizer", "sgd"], "argument --optimizer: invalid choice: 'sgd'"),
    (["--use_8bit_adam", "--optimizer", "prodigy"], "--use_8bit_adam is 8-bit AdamW and --optimizer prodigy"),
    (["--train_text_encoder_ti", "--pre_compute_text_embeddings"],
     "--pre_compute_text_embeddings cannot be used with --train_text_encoder_ti (the new tokens' embeddings train"),
    (["--train_text_encoder_ti", "--train_transformer_frac", "0"], "--train_transformer_frac must be in (0, 1]"),
    (["--train_text_encoder_ti", "--train_text_encoder_ti_frac", "0"], "--train_text_encoder_ti_frac must be in (0, 1]"),
    (["--train_text_encoder_ti", "--num_new_tokens_per_abstraction", "0"], "--num_new_tokens_per_abstraction must be >= 1"),
    (["--train_text_encoder_ti", "--token_abstraction", "two words"], "--token_abstraction 'two words': one word"),
    (["--prodigy_decouple", "maybe"], "argument --prodigy_decouple/--no-prodigy_decouple: expected true or false, got 'maybe'"),
])
def test_bad_flags_fail_in_one_line(flags, capsys, extra, message):
    run, out, _ = flags
    assert run(*extra) == 2
    assert message in one_line(capsys)
    assert not os.path.exists(out)


def test_a_token_word_in_no_prompt_is_warned_and_the_lora_still_trains(flags, capsys):
    """diffusers' advanced scripts go on when TOK is in no prompt (their own tests train so); we say loudly that
    the new tokens will not train."""
    run, out, _ = flags
    assert run("--train_text_encoder_ti", "--token_abstraction", "OBJ", "--max_train_steps", "1",
               "--report_to", "none") == 0
    err = capsys.readouterr().err
    assert ("warning: --token_abstraction OBJ: the word is in neither --instance_prompt nor any caption, so its new "
            "tokens will not train (the LoRA still does); name the subject with it, e.g. --instance_prompt "
            "'a photo of OBJ dog'") in err
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors") and os.path.isfile(out / "out_emb.safetensors")


def test_missing_prodigyopt_names_the_flag_and_the_install(flags, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "prodigyopt" else real(n, *a))
    run, out, _ = flags
    assert run("--optimizer", "Prodigy", "--learning_rate", "1") == 2
    assert one_line(capsys) == ("train_dreambooth_lora.py: error: --optimizer prodigy needs prodigyopt, an optional "
                                "package: pip install prodigyopt (or use --optimizer adamw)")
    assert not os.path.exists(out)


def test_optimizer_names_aliases_and_prodigy_switches(tiny_model, tmp_path):
    from dreambooth.families import StableDiffusion, resolve_family_flags
    from dreambooth.optimizers import check_optimizer_flags, state_bytes

    def parse_sd(argv):  # the flags as validate() leaves them for an SD base: the family's defaults filled in
        args = parse_args(argv)
        resolve_family_flags(args, StableDiffusion)
        return args
    base = ["--instance_prompt", "x"]
    notes = []
    args = parse_sd(base + ["--optimizer", "PRODIGY", "--prodigy_decouple", "false", "--no-prodigy_safeguard_warmup",
                              "--text_encoder_lr", "1e-4"])
    assert check_optimizer_flags(args, notes) == "prodigy" and args.optimizer == "prodigy"
    assert (args.prodigy_decouple, args.prodigy_use_bias_correction, args.prodigy_safeguard_warmup) == (False, True, False)
    assert any("--learning_rate 0.0005" in n and "use --learning_rate 1.0" in n for n in notes)  # AdamW-sized rate
    assert any("--text_encoder_lr 0.0001 is ignored" in n for n in notes)
    notes = []
    assert check_optimizer_flags(parse_sd(base + ["--optimizer", "prodigy", "--learning_rate", "1"]), notes) == "prodigy"
    assert notes == []
    args = parse_sd(base + ["--use_8bit_adam"])
    assert check_optimizer_flags(args, []) == "adamw8bit"
    assert check_optimizer_flags(parse_sd(base), []) == "adamw"
    # diffusers writes the switches with a value; a --config file with false turns them off too
    assert parse_args(base + ["--prodigy_use_bias_correction=False"]).prodigy_use_bias_correction is False
    config = tmp_path / "c.yaml"
    config.write_text("prodigy_decouple: false\noptimizer: AdamW8bit\n")
    args = parse_args(["--config", str(config)] + base)
    assert args.prodigy_decouple is False and args.optimizer == "adamw8bit"
    # checkpoint free-space estimate per optimizer: Prodigy keeps 4 fp32 tensors per weight, AdamW 2
    assert state_bytes("prodigy", 1000) == 2 * state_bytes("adamw", 1000) == 16000
    assert state_bytes("adamw8bit", 1000) < state_bytes("adamw", 1000) / 3


def test_prompts_are_rewritten_word_by_word():
    mapping = pivotal.token_map(pivotal.abstractions("TOK, OBJ"), 2)
    assert mapping == {"TOK": ["<s0>", "<s1>"], "OBJ": ["<s2>", "<s3>"]}
    assert pivotal.rewrite("a TOK dog near OBJ, TOKYO", mapping) == "a <s0><s1> dog near <s2><s3>, TOKYO"
    assert pivotal.rewrite("TOK", {}) == "TOK"


# ---- the rows that train ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family_name", ["sd", "sdxl"])
def test_only_new_rows_train_and_every_other_row_stays_bit_identical(family_name):
    """Three AdamW steps with weight decay (which would move every row of a trainable table): the new rows move,
    the original table is untouched, for every text encoder of the family; an initializer concept starts the
    rows at its tokens' embeddings."""
    from make_tiny_model import build_tiny_pipeline, build_tiny_sdxl_pipeline
    from dreambooth.families import StableDiffusion, StableDiffusionXL
    pipe = build_tiny_pipeline() if family_name == "sd" else build_tiny_sdxl_pipeline()
    family = (StableDiffusion if family_name == "sd" else StableDiffusionXL).from_pipeline(pipe)
    family.freeze()
    before = [e.get_input_embeddings().weight.detach().clone() for e in family.text_encoders]
    tokens = pivotal.PivotalTokens(family, {"TOK": ["<s0>", "<s1>"]}).install(initializer_concept="dog", seed=0)
    for tokenizer, module, table in zip(family.tokenizers, tokens.modules, before):
        assert tokenizer.tokenize("a <s0><s1> dog")[1:3] == ["<s0>", "<s1>"]
        (dog,) = tokenizer.encode("dog", add_special_tokens=False)
        assert torch.equal(module.new[0], table[dog].float()) and torch.equal(module.new[1], table[dog].float())
    init = [m.new.detach().clone() for m in tokens.modules]
    optimizer = torch.optim.AdamW(tokens.parameters(), lr=1e-2, weight_decay=0.1)
    prompts = family.tokenize(["a <s0><s1> dog", "a dog"])
    for _ in range(3):
        encoded = family.encode(prompts)
        encoded["encoder_hidden_states"][0].square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for module, table in zip(tokens.modules, before):
        assert torch.equal(module.base.weight, table)  # the original rows, bit for bit
        assert module.new.requires_grad and module.new.dtype == torch.float32
        assert not module.base.weight.requires_grad
    assert all((m.new - start).abs().min() > 0 for m, start in zip(tokens.modules, init))  # every value moved
    # the prompt without the new tokens encodes exactly as the base does; the one with them differently
    with torch.no_grad():
        now = family.encode(family.tokenize(["a dog"]))["encoder_hidden_states"]
        for module in tokens.modules:
            module.new.zero_()  # any other value for the new rows leaves "a dog" alone
        again = family.encode(family.tokenize(["a dog"]))["encoder_hidden_states"]
    assert torch.equal(now, again)
    state = tokens.state_dict()
    assert list(state) == list(family.embedding_file_keys)
    assert [tuple(v.shape) for v in state.values()] == [(2, e.config.hidden_size) for e in family.text_encoders]


# ---- end to end: train, resume across the pivot, load the embeddings ---------------------------------------
def resume_pair(model, instance_dir, tmp_path, *extra):
    """A 6-step run checkpointed at 3, and the same command resumed from its checkpoint-3 into another folder."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ["--instance_prompt", "a photo of TOK dog", "--max_train_steps", "6", "--checkpointing_steps", "3",
              "--train_text_encoder_ti", "--report_to", "none", *extra]
    r = run_main(*train_args(model, instance_dir, full, *common))
    assert r.returncode == 0, r.stderr[-3000:]
    r2 = run_main(*train_args(model, instance_dir, resumed, *common, "--resume_from_checkpoint", full / "checkpoint-3"))
    assert r2.returncode == 0, r2.stderr[-3000:]
    return full, resumed, r


def assert_same_tensors(a, b):
    a, b = load_file(a), load_file(b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def sd_prodigy(tiny_model, tmp_path_factory):
    """Prodigy + pivotal tuning + text-encoder LoRA + prior preservation + flips + accumulation on tiny SD."""
    tmp = tmp_path_factory.mktemp("sd_prodigy")
    dog = tmp / "dog"
    dog.mkdir()
    for i in range(3):
        draw_subject(dog / f"dog{i}.png", shift=i * 3)
    (dog / "dog2.txt").write_text("TOK dog on a beige floor")  # a caption names the subject with the word too
    full, resumed, r = resume_pair(
        tiny_model["eps"], str(dog), tmp, "--optimizer", "prodigy", "--learning_rate", "1.0", "--train_text_encoder",
        "--train_text_encoder_frac", "0.7", "--random_flip", "--with_prior_preservation", "--class_prompt",
        "a photo of dog", "--class_data_dir", tmp / "cls", "--num_class_images", "2", "--class_generation_steps", "1",
        "--gradient_accumulation_steps", "2", "--initializer_concept", "dog", "--logging_steps", "1")
    return {"full": full, "resumed": resumed, "run": r, "model": tiny_model["eps"]}


@pytest.mark.slow
def test_prodigy_pivotal_resume_is_bit_exact_across_the_pivot(sd_prodigy):
    full, resumed = sd_prodigy["full"], sd_prodigy["resumed"]
    assert_same_tensors(full / "pytorch_lora_weights.safetensors", resumed / "pytorch_lora_weights.safetensors")
    assert_same_tensors(full / "full_emb.safetensors", resumed / "resumed_emb.safetensors")
    # --train_text_encoder_ti_frac 0.5 of 6 steps: the rows train in steps 1-3 and are frozen after
    start = load_file(full / "checkpoint-3" / "full_emb.safetensors")["emb_params"]
    end = load_file(full / "full_emb.safetensors")["emb_params"]
    assert torch.equal(start, end)
    lora_start = load_file(full / "checkpoint-3" / "pytorch_lora_weights.safetensors")
    lora_end = load_file(full / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(lora_start[k], lora_end[k]) for k in lora_end if k.startswith("unet."))
    # the progress bar shows Prodigy's effective rate d x lr (d starts at 1e-6), not the 1.0 it was given
    lrs = [float(v) for v in re.findall(r"lr=([0-9.e+-]+)", sd_prodigy["run"].stderr)]
    assert lrs and lrs[0] == pytest.approx(1e-6, rel=0.01) and max(lrs) < 1e-3
    opt = torch.load(full / "checkpoint-3" / "optimizer.bin", weights_only=False)
    assert [g["lr"] for g in opt["param_groups"]] == [1.0, 1.0, 1.0] and "d" in opt["param_groups"][0]
    assert {"p0", "s", "exp_avg", "exp_avg_sq"} <= set(opt["state"][0])


@pytest.mark.slow
def test_prodigy_pivotal_outputs_record_the_optimizer_and_the_prompt(sd_prodigy):
    full = sd_prodigy["full"]
    with safe_open(full / "full.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["ss_optimizer"].startswith("prodigyopt.prodigy.Prodigy(") and "decouple=True" in meta["ss_optimizer"]
    assert json.loads(meta["ss_token_map"]) == {"TOK": ["<s0>", "<s1>"]}
    assert meta["ss_embeddings"] == "full_emb.safetensors" and meta["ss_embedding_prompt"] == "a photo of full_emb dog"
    with safe_open(full / "full_emb.safetensors", "pt") as f:
        assert list(f.keys()) == ["emb_params"]  # the SD 1.x layout A1111 and ComfyUI read
        assert json.loads(f.metadata()["dreambooth_token_map"]) == {"TOK": ["<s0>", "<s1>"]}
    card = open(full / "README.md").read()
    assert "| optimizer | prodigy |" in card and "`TOK` -> 2 new token(s)" in card
    assert "`a photo of <s0><s1> dog`" in card and "`a photo of full_emb dog`" in card
    # The card's diffusers snippet runs as written: it loads the LoRA and the tokens and prompts with them.
    snippet = card.split("## Use it with diffusers")[1].split("```python\n")[1].split("```")[0]
    assert 'pipe.load_textual_inversion(emb["emb_params"], token=["<s0>", "<s1>"]' in snippet
    assert 'pipe("a photo of <s0><s1> dog in a bucket")' in snippet
    scope = {}
    exec(snippet, scope)
    assert scope["image"].size == (64, 64)
    assert scope["pipe"].tokenizer.convert_tokens_to_ids("<s1>") == len(scope["pipe"].tokenizer) - 1
    config = open(full / "config.yaml").read()
    assert "optimizer: prodigy" in config and "train_text_encoder_ti: true" in config
    settings = json.load(open(full / "checkpoint-3" / "lora_settings.json"))
    assert settings["optimizer"] == "prodigy" and settings["num_new_tokens_per_abstraction"] == 2


@pytest.mark.slow
def test_resume_with_another_optimizer_is_refused(sd_prodigy, tmp_path, capsys):
    dog = tmp_path / "dog"
    dog.mkdir()
    draw_subject(dog / "a.png")
    code = train_dreambooth_lora.main(train_args(sd_prodigy["model"], str(dog), str(tmp_path / "o"),
                                                 "--instance_prompt", "a photo of TOK dog", "--train_text_encoder_ti",
                                                 "--train_text_encoder", "--max_train_steps", "6",
                                                 "--resume_from_checkpoint", str(sd_prodigy["full"] / "checkpoint-3")))
    assert code == 2
    assert "was saved with --optimizer prodigy; this run has --optimizer adamw" in one_line(capsys)


@pytest.mark.slow
def test_sd_embeddings_load_in_diffusers_and_change_only_prompts_with_the_token(sd_prodigy, tmp_path):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(sd_prodigy["model"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def image(prompt):
        return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images[0]
    plain = image("a photo of dog")
    emb = load_file(sd_prodigy["full"] / "full_emb.safetensors")
    pipe.load_textual_inversion(emb["emb_params"], token=["<s0>", "<s1>"])
    assert (image("a photo of dog") == plain).all()  # no token in the prompt: the same image, bit for bit
    assert abs(image("a photo of <s0><s1> dog") - plain).max() > 1e-3
    # A1111's way: the single-key file under its own word
    fresh = StableDiffusionPipeline.from_pretrained(sd_prodigy["model"], safety_checker=None)
    fresh.load_textual_inversion(str(sd_prodigy["full"] / "full_emb.safetensors"), token="full_emb")
    assert fresh.tokenizer.convert_tokens_to_ids(["full_emb", "full_emb_1"]) == \
        pipe.tokenizer.convert_tokens_to_ids(["<s0>", "<s1>"])
    # infer.py finds the file beside the LoRA and rewrites TOK in the prompt
    import infer
    out = tmp_path / "inf"
    assert infer.main(["--base", sd_prodigy["model"], "--lora", str(sd_prodigy["full"]), "--prompt", "a photo of TOK dog",
                       "--prompt", "a photo of <s0><s1> dog", "--num_images", "1", "--steps", "2", "--output", str(out),
                       "--device", "cpu"]) == 0
    from PIL import Image
    import numpy as np
    a = np.asarray(Image.open(out / "00-00-a_photo_of_tok_dog.png"))
    b = np.asarray(Image.open(out / "01-00-a_photo_of_s0_s1_dog.png"))
    assert (a == b).all()


@pytest.mark.slow
def test_sdxl_8bit_adam_pivotal_with_buckets_and_cached_latents(tiny_model, tmp_path):
    """SDXL: tokens in both tokenizers, clip_l/clip_g rows, exact resume with 8-bit AdamW, cached latents and
    aspect-ratio buckets; the file loads into both text encoders with load_textual_inversion."""
    dog = tmp_path / "dog"
    dog.mkdir()
    for i, size in enumerate([(128, 64), (64, 128), (64, 64)]):
        draw_subject(dog / f"dog{i}.png", size=size)
    full, resumed, r = resume_pair(tiny_model["xl"], str(dog), tmp_path, "--optimizer", "adamw8bit", "--cache_latents",
                                   "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "128",
                                   "--output_format", "diffusers")
    assert "TOK -> <s0><s1> in 2 tokenizer(s)" in r.stdout
    assert_same_tensors(full / "pytorch_lora_weights.safetensors", resumed / "pytorch_lora_weights.safetensors")
    assert_same_tensors(full / "full_emb.safetensors", resumed / "resumed_emb.safetensors")
    opt = torch.load(full / "checkpoint-3" / "optimizer.bin", weights_only=False)
    assert "__bnb_optimizer_quant_state__" in opt["state"][0]
    assert "| optimizer | adamw8bit |" in open(full / "README.md").read()
    emb = load_file(full / "full_emb.safetensors")
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model["xl"])
    pipe.set_progress_bar_config(disable=True)
    assert list(emb) == ["clip_g", "clip_l"] and emb["clip_l"].shape == (2, pipe.text_encoder.config.hidden_size) \
        and emb["clip_g"].shape == (2, pipe.text_encoder_2.config.hidden_size)

    def image(prompt):
        return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images[0]
    plain = image("a photo of dog")
    mapping = pivotal.load_into_pipeline(pipe, str(full / "full_emb.safetensors"))
    assert mapping == {"TOK": ["<s0>", "<s1>"]}
    for tokenizer, encoder, key in ((pipe.tokenizer, pipe.text_encoder, "clip_l"),
                                    (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
        ids = tokenizer.convert_tokens_to_ids(["<s0>", "<s1>"])
        assert torch.equal(encoder.get_input_embeddings().weight[ids].float(), emb[key])
    assert (image("a photo of dog") == plain).all()
    assert abs(image("a photo of <s0><s1> dog") - plain).max() > 1e-3
