"""Outputs that need their companions, and the rest of issue #25's loading lines: a pivotal-tuning LoRA loads with
its trained tokens wherever a LoRA loads (infer.py, evaluate.py, examples/demo_grids.py), found from any of the
run's files, or one line names the missing file; stacked pivotal LoRAs keep their own tokens; an embeddings file
bundled in a LoRA loads too. Then the images every command reads (16-bit and other modes), NaN images never
written as black squares, user mistakes as one line instead of "internal error", and the shipped toy base loading
in plain diffusers. Most cases fail before any model loads, in-process: a subprocess costs seconds of imports."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import evaluate
import infer
import train_dreambooth_lora
from conftest import ROOT, draw_subject

pytestmark = pytest.mark.filterwarnings("ignore")
COMMON = ["--steps", "1", "--num_images", "1", "--device", "cpu", "--height", "32", "--width", "32"]


@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch):
    monkeypatch.delenv("DREAMBOOTH_DEBUG", raising=False)


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """Two pivotal-tuning runs on tiny SD, 2 steps each: 'dog' (TOK, checkpoints at steps 1 and 2, both output
    formats) and 'cat' (CAT, diffusers file only)."""
    tmp = tmp_path_factory.mktemp("companions")
    photos = tmp / "photos"
    photos.mkdir()
    for i in range(2):
        draw_subject(photos / f"{i}.png", shift=i)
    out = {"base": tiny_model["eps"], "tmp": tmp}
    for name, word, extra in (("dog", "TOK", ["--checkpointing_steps", "1"]),
                              ("cat", "CAT", ["--output_format", "diffusers"])):
        code = train_dreambooth_lora.main([
            "--pretrained_model_name_or_path", tiny_model["eps"], "--instance_data_dir", str(photos),
            "--instance_prompt", f"a photo of {word} dog", "--token_abstraction", word, "--train_text_encoder_ti",
            "--output_dir", str(tmp / name), "--resolution", "32", "--max_train_steps", "2", "--seed", "0",
            "--report_to", "none", *extra])
        assert code == 0
        out[name] = tmp / name
    return out


def one_line(capsys, prog):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0].removeprefix(f"{prog}: error: ")


def alone(runs, tmp_path, *relative):
    """Copies of some of a run's files in a folder of their own, as a user copies a LoRA somewhere else."""
    folder = tmp_path / "alone"
    folder.mkdir(exist_ok=True)
    for rel in relative:
        shutil.copy(runs["dog"] / rel, folder / os.path.basename(rel))
    return folder


# ---- the run's files name their companion ------------------------------------------------------------------
def test_every_lora_file_of_a_pivotal_run_names_its_embeddings_file(runs):
    dog = runs["dog"]
    for rel in ("pytorch_lora_weights.safetensors", "checkpoint-1/pytorch_lora_weights.safetensors"):
        with safe_open(dog / rel, "pt") as f:
            meta = f.metadata()
        assert meta["dreambooth_embeddings"] == "dog_emb.safetensors", rel
        assert json.loads(meta["dreambooth_token_map"]) == {"TOK": ["<s0>", "<s1>"]}
        assert "lora_adapter_metadata" in meta and meta["format"] == "pt"  # diffusers' own entries kept
    for rel in ("dog.safetensors", "checkpoint-1/dog-step00000001.safetensors"):
        with safe_open(dog / rel, "pt") as f:
            assert f.metadata()["ss_embeddings"] == "dog_emb.safetensors", rel
    from dreambooth import pivotal
    found = {rel: pivotal.lora_embeddings(str(dog / rel)) for rel in (
        ".", "pytorch_lora_weights.safetensors", "dog.safetensors", "checkpoint-1",
        "checkpoint-1/pytorch_lora_weights.safetensors", "checkpoint-1/dog-step00000001.safetensors")}
    assert {rel: os.path.relpath(path, dog) for rel, path in found.items()} == {
        ".": "dog_emb.safetensors", "pytorch_lora_weights.safetensors": "dog_emb.safetensors",
        "dog.safetensors": "dog_emb.safetensors", "checkpoint-1": "checkpoint-1/dog_emb.safetensors",
        "checkpoint-1/pytorch_lora_weights.safetensors": "checkpoint-1/dog_emb.safetensors",
        "checkpoint-1/dog-step00000001.safetensors": "checkpoint-1/dog_emb.safetensors"}


def test_added_header_metadata_leaves_the_tensors_as_they_were(tmp_path):
    from dreambooth.files import add_safetensors_metadata, safetensors_metadata
    tensors = {"a": torch.arange(7, dtype=torch.float16), "b.lora_A.weight": torch.randn(3, 5)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    for extra in ({"k": "v"}, {"k": "v" * 13}):  # header lengths that do and do not need padding
        add_safetensors_metadata(tmp_path / "x.safetensors", tmp_path / "y.safetensors", extra)
        back = load_file(tmp_path / "y.safetensors")
        assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
        assert safetensors_metadata(str(tmp_path / "y.safetensors")) == {"format": "pt", **extra}


# ---- a LoRA without its companion: one line, before any model loads ---------------------------------------
MISSING = ("its new tokens (TOK -> <s0><s1>, from pivotal tuning) are in dog_emb.safetensors, which is not in {dir}; "
           "copy that file there from the same training output or checkpoint-N folder, or give --lora that folder")


@pytest.mark.parametrize("rel", ["pytorch_lora_weights.safetensors", "dog.safetensors",
                                 "checkpoint-1/pytorch_lora_weights.safetensors",
                                 "checkpoint-1/dog-step00000001.safetensors"])
def test_infer_refuses_a_pivotal_lora_file_without_its_embeddings(runs, tmp_path, capsys, rel):
    folder = alone(runs, tmp_path, rel)
    lora = str(folder / os.path.basename(rel))
    assert infer.main(["--base", runs["base"], "--lora", lora, "--prompt", "a TOK dog", *COMMON,
                       "--output", str(tmp_path / "out")]) == 2
    assert one_line(capsys, "infer.py") == f"--lora {lora}: " + MISSING.format(dir=folder)
    assert not os.path.exists(tmp_path / "out")


def test_a_run_folder_without_its_embeddings_is_refused_everywhere(runs, tmp_path, capsys, tiny_judges):
    folder = alone(runs, tmp_path, "pytorch_lora_weights.safetensors", "dog.safetensors")
    line = f"--lora {folder}: " + MISSING.format(dir=folder)
    assert infer.main(["--base", runs["base"], "--lora", str(folder), "--prompt", "a TOK dog", *COMMON,
                       "--output", str(tmp_path / "out")]) == 2
    assert one_line(capsys, "infer.py") == line
    assert evaluate.main(["--base", runs["base"], "--lora", str(folder), "--real_dir", str(folder), "--class_name",
                          "dog", "--identifier", "TOK", "--dino_model", tiny_judges["dino"], "--clip_model",
                          tiny_judges["clip"], "--output", str(tmp_path / "out")]) == 2
    assert one_line(capsys, "evaluate.py") == line
    import demo_grids
    assert demo_grids.main(["--base", runs["base"], "--lora", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert one_line(capsys, "demo_grids.py") == line
    assert not os.path.exists(tmp_path / "out")


def test_the_embeddings_file_given_as_the_lora_is_one_line(runs, tmp_path, capsys, tiny_judges):
    emb = str(runs["dog"] / "dog_emb.safetensors")
    line = (f"--lora {emb} is the new tokens' embeddings file of a pivotal-tuning run, not a LoRA; give the run's "
            "folder or its LoRA file, which bring this file with them")
    assert infer.main(["--base", runs["base"], "--lora", emb, "--prompt", "p", *COMMON,
                       "--output", str(tmp_path / "out")]) == 2
    assert one_line(capsys, "infer.py") == line
    assert evaluate.main(["--base", runs["base"], "--lora", emb, "--real_dir", str(tmp_path), "--class_name", "dog",
                          "--output", str(tmp_path / "out")]) == 2
    assert one_line(capsys, "evaluate.py") == line
    import demo_grids
    assert demo_grids.main(["--lora", emb, "--out", str(tmp_path / "out")]) == 2
    assert one_line(capsys, "demo_grids.py") == line


def test_a_pickled_lora_is_refused_before_loading(runs, tmp_path, capsys):
    """diffusers' old pytorch_lora_weights.bin: was 'not a readable .safetensors file (truncated or corrupt...);
    download or copy it again', a wrong diagnosis."""
    (tmp_path / "pytorch_lora_weights.bin").write_bytes(b"PK\x03\x04")
    lora = str(tmp_path / "pytorch_lora_weights.bin")
    line = (f"--lora {lora}: not a .safetensors file; LoRAs are read only as .safetensors (a .bin, .pt or .ckpt "
            "pickle can run code when loaded): give the .safetensors version")
    assert infer.main(["--base", runs["base"], "--lora", lora, "--prompt", "p", *COMMON,
                       "--output", str(tmp_path / "out")]) == 2
    assert one_line(capsys, "infer.py") == line
    assert evaluate.main(["--base", runs["base"], "--lora", lora, "--real_dir", str(tmp_path), "--class_name", "dog",
                          "--output", str(tmp_path / "out")]) == 2
    assert one_line(capsys, "evaluate.py") == line
    assert not os.path.exists(tmp_path / "out")


def test_two_loras_with_one_word_or_one_lora_twice_are_one_line(runs, tmp_path, capsys):
    dog, final = str(runs["dog"] / "checkpoint-1"), str(runs["dog"])
    assert infer.main(["--base", runs["base"], "--lora", final, "--lora", dog, "--prompt", "p", *COMMON,
                       "--output", str(tmp_path / "out")]) == 2
    assert one_line(capsys, "infer.py") == (
        f"--lora {dog} and --lora {final} both trained new tokens for the word TOK, so a prompt cannot say which "
        "subject it means; stack LoRAs trained with different --token_abstraction words (retrain one, e.g. with "
        "--token_abstraction TOK2)")
    assert infer.main(["--base", runs["base"], "--lora", final, "--lora", final + "/", "--prompt", "p", *COMMON,
                       "--output", str(tmp_path / "out")]) == 2
    assert one_line(capsys, "infer.py") == f"--lora {final}/ is given twice; give it once (--lora_scale sets its strength)"


# ---- with its companion: the tokens load, from every file of the run ------------------------------------
def image(path):
    with Image.open(path) as im:
        return np.asarray(im).astype(int)


def test_infer_loads_the_tokens_from_each_file_of_the_run_and_stacks_two_runs(runs, tmp_path, capsys):
    def run(name, *args):
        assert infer.main(["--base", runs["base"], *args, *COMMON, "--output", str(tmp_path / name)]) == 0
        return capsys.readouterr().err
    err = run("ui", "--lora", str(runs["dog"] / "checkpoint-2" / "dog-step00000002.safetensors"), "--prompt",
              "a photo of TOK dog")
    assert "infer.py: new tokens loaded: TOK -> <s0><s1>" in err
    err = run("file", "--lora", str(runs["dog"] / "pytorch_lora_weights.safetensors"), "--prompt",
              "a photo of TOK dog", "--prompt", "a photo of <s0><s1> dog")
    assert "infer.py: new tokens loaded: TOK -> <s0><s1>" in err
    assert (image(tmp_path / "file" / "00-00-a_photo_of_tok_dog.png")
            == image(tmp_path / "file" / "01-00-a_photo_of_s0_s1_dog.png")).all()
    # the UI file of the last checkpoint is the final LoRA in the kohya layout: the same picture, within rounding
    assert np.abs(image(tmp_path / "ui" / "00-00-a_photo_of_tok_dog.png")
                  - image(tmp_path / "file" / "00-00-a_photo_of_tok_dog.png")).max() <= 2
    # two pivotal runs stacked: the second's <s0><s1> load as <s2><s3>, each word gets its own run's rows
    err = run("two", "--lora", str(runs["dog"]), "--lora", str(runs["cat"]), "--prompt", "a TOK dog and a CAT dog")
    assert "infer.py: new tokens loaded: TOK -> <s0><s1>, CAT -> <s2><s3>" in err
    from diffusers import StableDiffusionPipeline
    from dreambooth.lora_loading import load_embeddings
    pipe = StableDiffusionPipeline.from_pretrained(runs["base"])
    assert load_embeddings(pipe, str(runs["dog"])) == {"TOK": ["<s0>", "<s1>"]}
    assert load_embeddings(pipe, str(runs["cat"])) == {"CAT": ["<s2>", "<s3>"]}
    rows = pipe.text_encoder.get_input_embeddings().weight
    ids = pipe.tokenizer.convert_tokens_to_ids(["<s0>", "<s1>", "<s2>", "<s3>"])
    assert torch.equal(rows[ids[:2]], load_file(runs["dog"] / "dog_emb.safetensors")["emb_params"])
    assert torch.equal(rows[ids[2:]], load_file(runs["cat"] / "cat_emb.safetensors")["emb_params"])


def test_embeddings_bundled_in_the_lora_file_load_under_their_name(runs, tmp_path, capsys):
    """kohya's bundle_emb.<name>.* keys (A1111 reads them): diffusers took them for LoRA weights and failed, which
    infer.py reported as 'does not fit --base'. The prompt names the embedding by its name, as in A1111."""
    state = load_file(runs["dog"] / "dog.safetensors")
    state["bundle_emb.mydog.string_to_param.*"] = load_file(runs["dog"] / "dog_emb.safetensors")["emb_params"]
    save_file(state, tmp_path / "bundled.safetensors")
    assert infer.main(["--base", runs["base"], "--lora", str(tmp_path / "bundled.safetensors"), "--prompt",
                       "a photo of mydog dog", *COMMON, "--output", str(tmp_path / "b")]) == 0
    assert "infer.py: new tokens loaded: mydog -> <mydog_0><mydog_1>" in capsys.readouterr().err
    assert infer.main(["--base", runs["base"], "--lora", str(runs["dog"] / "dog.safetensors"), "--prompt",
                       "a photo of TOK dog", *COMMON, "--output", str(tmp_path / "c")]) == 0
    assert (image(tmp_path / "b" / "00-00-a_photo_of_mydog_dog.png")
            == image(tmp_path / "c" / "00-00-a_photo_of_tok_dog.png")).all()


def test_evaluate_loads_the_tokens_and_prompts_with_them(runs, tmp_path, capsys, tiny_judges, monkeypatch):
    from dreambooth import evaluation
    common = ["--base", runs["base"], "--real_dir", str(runs["tmp"] / "photos"), "--class_name", "dog",
              "--num_prompts", "1", "--num_images", "1", "--num_class_images", "0", "--steps", "1", "--resolution",
              "32", "--dino_model", tiny_judges["dino"], "--clip_model", tiny_judges["clip"], "--no_progress"]
    assert evaluate.main([*common, "--lora", str(runs["dog"]), "--output", str(tmp_path / "e")]) == 2
    assert one_line(capsys, "evaluate.py") == (f"--identifier sks: --lora {runs['dog']} was trained with pivotal "
                                               "tuning, and its subject's word is TOK; give --identifier TOK")
    assert not os.path.exists(tmp_path / "e")
    asked = []
    real = evaluation.generate
    monkeypatch.setattr(evaluation, "generate", lambda pipe, prompts, *a, **k: asked.append(list(prompts)) or
                        real(pipe, prompts, *a, **k))
    assert evaluate.main([*common, "--lora", str(runs["dog"]), "--checkpoints", "--identifier", "TOK",
                          "--output", str(tmp_path / "e")]) == 0
    # checkpoint-1, checkpoint-2, final: each one's own rows, under names the earlier ones did not take
    assert asked == [["a <s0><s1> dog in the jungle"], ["a <s2><s3> dog in the jungle"], ["a <s4><s5> dog in the jungle"]]
    names = [r["name"] for r in json.loads((tmp_path / "e" / "metrics.json").read_text())["results"]]
    assert names == ["real images", "checkpoint-1", "checkpoint-2", "final"]
    rows = {r["name"]: r for r in json.loads((tmp_path / "e" / "metrics.json").read_text())["results"]}
    assert rows["final"]["DINO"] == pytest.approx(rows["checkpoint-2"]["DINO"], abs=1e-6)  # same weights, same rows


def test_resuming_a_pivotal_checkpoint_without_its_embeddings_is_one_line(runs, tmp_path, capsys):
    shutil.copytree(runs["dog"] / "checkpoint-1", tmp_path / "out" / "checkpoint-1")
    os.remove(tmp_path / "out" / "checkpoint-1" / "dog_emb.safetensors")
    before = sorted(os.listdir(tmp_path / "out" / "checkpoint-1"))
    assert train_dreambooth_lora.main([
        "--pretrained_model_name_or_path", runs["base"], "--instance_data_dir", str(runs["tmp"] / "photos"),
        "--instance_prompt", "a photo of TOK dog", "--train_text_encoder_ti", "--output_dir", str(tmp_path / "out"),
        "--resolution", "32", "--max_train_steps", "2", "--resume_from_checkpoint", "latest"]) == 2
    assert one_line(capsys, "train_dreambooth_lora.py") == (
        f"--resume_from_checkpoint {tmp_path / 'out' / 'checkpoint-1'} is corrupt or incomplete (the new tokens' "
        "embeddings file, *_emb.safetensors, is missing); no earlier checkpoint is usable; start again without "
        "--resume_from_checkpoint")
    assert sorted(os.listdir(tmp_path / "out" / "checkpoint-1")) == before


def test_the_model_card_snippet_runs_as_written(runs):
    card = (runs["dog"] / "README.md").read_text()
    snippet = card.split("## Use it with diffusers")[1].split("```python\n")[1].split("```")[0]
    assert 'from_pretrained("' + runs["base"] + '", torch_dtype=dtype).to(device)' in snippet
    scope = {}
    exec(snippet.replace('in a bucket")', 'in a bucket", num_inference_steps=1, height=32, width=32)'), scope)
    assert scope["image"].size == (32, 32) and scope["pipe"].text_encoder.dtype == torch.float32


# ---- images every command reads ------------------------------------------------------------------------------
def odd_images(folder):
    """One image per mode a plain convert('RGB') gets wrong, each with a known grey level at its centre."""
    folder.mkdir()
    grey = np.full((16, 16), 128 * 257, dtype=np.uint16)
    Image.fromarray(grey).save(folder / "i16.png")                      # I;16: plain convert saturates to white
    Image.new("LA", (16, 16), (128, 255)).save(folder / "la.png")
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([255, 0, 0, 128, 128, 128] + [0] * 762)
    palette.save(folder / "p.png", transparency=0)
    Image.new("RGB", (16, 16), (128, 128, 128)).convert("CMYK").save(folder / "cmyk.jpg", quality=100)
    Image.new("1", (16, 16), 1).save(folder / "bilevel.bmp")
    return {"i16.png": 128, "la.png": 128, "p.png": 128, "cmyk.jpg": 128, "bilevel.bmp": 255}


def test_evaluate_reads_16_bit_and_other_modes_as_the_trainer_does(tmp_path):
    from dreambooth.evaluation import real_images
    from dreambooth.images import load_rgb
    expected = odd_images(tmp_path / "real")
    images = real_images(str(tmp_path / "real"))
    for (name, level), im in zip(sorted(expected.items()), images):
        assert im.mode == "RGB" and abs(int(np.asarray(im)[8, 8].mean()) - level) <= 2, name
        assert (np.asarray(im) == np.asarray(load_rgb(str(tmp_path / "real" / name)))).all(), name


def test_dataset_rows_are_decoded_before_they_are_saved(tmp_path):
    pytest.importorskip("datasets")
    from dreambooth.config import UsageError, dataset_to_folder
    (tmp_path / "ds").mkdir()
    Image.fromarray(np.full((16, 16), 128 * 257, dtype=np.uint16)).save(tmp_path / "ds" / "a.png")
    Image.new("RGB", (16, 16), (128, 128, 128)).convert("CMYK").save(tmp_path / "ds" / "b.jpg", quality=100)
    (tmp_path / "ds" / "metadata.csv").write_text("file_name,text\na.png,a dog\nb.jpg,a dog\n")
    for path in dataset_to_folder(str(tmp_path / "ds"), "image", "text"):  # CMYK cannot be saved as PNG as it is
        with Image.open(path) as im:
            assert im.mode == "RGB" and abs(int(np.asarray(im)[8, 8].mean()) - 128) <= 2
    with pytest.raises(UsageError) as e:
        dataset_to_folder(str(tmp_path / "ds"), "text", None)
    assert str(e.value) == (f"--image_column text: row 0 of {tmp_path / 'ds'} is not a readable image ([Errno 2] No "
                            "such file or directory: 'a dog'); give the column that holds the images")


# ---- user mistakes: one line, before or right after the model loads -----------------------------------------
@pytest.mark.parametrize("args,line", [
    (["--lora_scale", "1e30", "--lora", "{dog}"],
     "--lora_scale 1e+30: out of range; give a strength from -10 to 10 (1 is the LoRA as trained, 0 turns it off)"),
    (["--lora_scale", "-11", "--lora", "{dog}"],
     "--lora_scale -11: out of range; give a strength from -10 to 10 (1 is the LoRA as trained, 0 turns it off)"),
    (["--height", "0"], "--height must be a multiple of 8, at least 8 (got 0); leave it out for the model's own size"),
    (["--width", "-8"], "--width must be a multiple of 8, at least 8 (got -8); leave it out for the model's own size"),
    (["--device", "gpu"], "--device gpu: unknown device; use auto, cpu, cuda, cuda:N or mps"),
])
def test_infer_flag_mistakes_before_loading(runs, tmp_path, capsys, monkeypatch, args, line):
    monkeypatch.setattr(infer, "load_base", lambda *a: pytest.fail("loaded a model for a flag error"))
    args = [a.format(dog=runs["dog"]) for a in args]
    assert infer.main(["--base", runs["base"], "--prompt", "p", *COMMON, *args, "--output", str(tmp_path / "o")]) == 2
    assert one_line(capsys, "infer.py") == line
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("model,args,line", [
    ("eps", ["--steps", "1001"], "--steps 1001: more than the 1000 noise levels the model was trained on; give at "
                                 "most 1000 (the family's default, 30, is usually enough)"),
    ("eps", ["--negative_prompt", "blurry", "--guidance_scale", "1"],
     "--negative_prompt is not used at --guidance_scale 1 (classifier-free guidance, which reads it, runs only above "
     "1); raise --guidance_scale or leave --negative_prompt out"),
    ("eps", ["--guidance_scale", "1e30"], "--prompt \"p\": the images came out as NaN (not-a-number pixels, which "
     "diffusers would save as black squares); --guidance_scale 1e+30 amplifies the prompt's push past the number "
     "range; use 1-15; nothing was written"),
    ("sd3", ["--height", "72"], "--height 72: SD 3 makes images whose sides are multiples of 16; give 64 or 80"),
    ("flux_schnell", ["--negative_prompt", "blurry"], "--negative_prompt: Flux.1 takes no negative prompt (its "
     "guidance is distilled into the model, and FluxPipeline ignores one); leave it out"),
    ("flux_schnell", ["--guidance_scale", "7"], "--guidance_scale 7: Flux.1-schnell takes no guidance (it was "
     "distilled to sample without it, and its pipeline ignores the value); leave --guidance_scale out"),
], ids=["steps", "negative_without_cfg", "nan_images", "sd3_size", "flux_negative", "schnell_guidance"])
def test_infer_mistakes_the_model_reveals(tiny_model, tmp_path, capsys, model, args, line):
    assert infer.main(["--base", tiny_model[model], "--prompt", "p", *COMMON[:-4], *args,
                       "--output", str(tmp_path / "o")]) == 2
    assert one_line(capsys, "infer.py") == line
    assert not os.path.exists(tmp_path / "o")


def test_a_lora_with_nan_weights_and_running_out_of_memory_are_one_line(runs, tmp_path, capsys, monkeypatch):
    state = load_file(runs["cat"] / "pytorch_lora_weights.safetensors")
    key = sorted(state)[0]
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, tmp_path / "nan.safetensors")
    lora = str(tmp_path / "nan.safetensors")
    assert infer.main(["--base", runs["base"], "--lora", lora, "--prompt", "p", *COMMON,
                       "--output", str(tmp_path / "o")]) == 2
    assert one_line(capsys, "infer.py") == (f"--lora {lora}: 1 of its weights hold NaN or infinite numbers (its "
                                            "training diverged); use an earlier checkpoint-N of the run, or retrain "
                                            "with a lower learning rate")
    from diffusers import StableDiffusionPipeline

    def no_memory(*a, **k):  # what torch's CPU allocator raises
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 26214400000 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", no_memory)
    assert infer.main(["--base", runs["base"], "--prompt", "p", *COMMON, "--output", str(tmp_path / "o")]) == 2
    assert one_line(capsys, "infer.py") == ("out of memory on cpu making 1 image(s) of 32x32 at once; lower "
                                            "--num_images (one batch per prompt) or --height/--width, or use --dtype "
                                            "fp16 on a GPU")
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("args,line", [
    (["--resolution", "100"],
     "--resolution must be a multiple of 8, at least 8 (got 100); leave it out for the model's own size"),
    (["--device", "gpu"], "--device gpu: unknown device; use auto, cpu, cuda, cuda:N or mps"),
    (["--eval_device", "cuda"], "--eval_device cuda: torch sees no CUDA GPU here (torch {torch}); use --eval_device "
                                "cpu or auto"),
    (["--seed", "-1"], "argument --seed: -1 is outside 0..4294967295 (the range numpy and torch both accept)"),
    (["--guidance_scale", "inf"], "argument --guidance_scale: inf is not a finite number"),
    (["--class_prompt", " "], "--class_prompt is empty; leave it out for 'a dog', or give the class prompt the run "
                              "was trained with"),
    (["--lora", "{tmp}"], "--lora {tmp}: folder has no LoRA .safetensors file; give a training output folder, a "
                          "checkpoint-N folder or a .safetensors LoRA"),
    (["--num_images", "0"], "--num_images 0: must be at least 1"),
])
def test_evaluate_flag_mistakes_before_loading(tmp_path, capsys, monkeypatch, args, line):
    from dreambooth import evaluation
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(evaluation, "Dino", lambda *a: pytest.fail("loaded a model for a flag error"))
    (tmp_path / "real").mkdir()
    draw_subject(tmp_path / "real" / "a.png")
    args = [a.format(tmp=tmp_path) for a in args]
    assert evaluate.main(["--base", "x/y", "--real_dir", str(tmp_path / "real"), "--class_name", "dog", *args,
                          "--output", str(tmp_path / "o")]) == 2
    assert one_line(capsys, "evaluate.py") == line.format(tmp=tmp_path, torch=torch.__version__)
    assert not os.path.exists(tmp_path / "o")


def test_evaluate_mistakes_the_model_reveals_leave_earlier_results_alone(runs, tmp_path, capsys, tiny_judges):
    common = ["--base", runs["base"], "--real_dir", str(runs["tmp"] / "photos"), "--class_name", "dog",
              "--num_prompts", "1", "--num_images", "1", "--num_class_images", "0", "--steps", "1",
              "--dino_model", tiny_judges["dino"], "--clip_model", tiny_judges["clip"], "--no_progress",
              "--output", str(tmp_path / "e")]
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "metrics.json").write_text("an earlier evaluation")
    for args, line in (
            (["--resolution", "32", "--guidance_scale", "1e30"], "the images of \"a sks dog in the jungle\" came out as "
             "NaN (not-a-number pixels, which diffusers would save as black squares); --guidance_scale 1e+30 "
             "amplifies the prompt's push past the number range; use 1-15; nothing was written"),
            (["--resolution", "32", "--steps", "5000"], "--steps 5000: more than the 1000 noise levels the model was "
             "trained on; give at most 1000 (the family's default, 30, is usually enough)")):
        assert evaluate.main([*common, *args]) == 2
        assert one_line(capsys, "evaluate.py") == line
    assert os.listdir(tmp_path / "e") == ["metrics.json"]
    assert (tmp_path / "e" / "metrics.json").read_text() == "an earlier evaluation"


def test_demo_grids_mistakes_are_one_line(tmp_path, capsys):
    import demo_grids
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "lora.safetensors").write_text("x")
    for args, line in (
            (["--lora", "/nonexistent/run"], "--lora /nonexistent/run: no such file or folder; give the training "
             "--output_dir of a toy run (make demo writes work_dirs/toy-demo)"),
            (["--lora", str(tmp_path / "empty")], f"--lora {tmp_path / 'empty'}: folder has no LoRA .safetensors file; "
             "give a finished run's --output_dir or one of its checkpoint-N folders"),
            (["--lora", str(tmp_path), "--base", str(tmp_path)], f"--base {tmp_path}: not a diffusers model folder (no "
             "model_index.json); leave --base out for the shipped toy base, examples/toy-base"),
            (["--lora", str(tmp_path / "run"), "--num_images", "0"], "--num_images 0: must be at least 1"),
            (["--lora", str(tmp_path / "run"), "--num_images", "x"], "argument --num_images: invalid int value: 'x'"),
            (["--lora", str(tmp_path / "file")], f"--lora {tmp_path / 'file'}: not a .safetensors file; LoRAs are "
             "read only as .safetensors (a .bin, .pt or .ckpt pickle can run code when loaded): give the .safetensors "
             "version")):
        assert demo_grids.main([*args, "--out", str(tmp_path / "out")]) == 2
        assert one_line(capsys, "demo_grids.py") == line
    assert demo_grids.main(["--lora", str(tmp_path / "run"), "--out", str(tmp_path / "file")]) == 2
    assert one_line(capsys, "demo_grids.py") == f"--out {tmp_path / 'file'}: {tmp_path / 'file'} is a file; give a folder"
    assert not os.path.exists(tmp_path / "out")


# ---- the shipped toy base in plain diffusers -----------------------------------------------------------------
def test_the_toy_base_runs_in_plain_diffusers():
    """StableDiffusionPipeline.from_pretrained(base) with no torch_dtype, as the model card's users write it:
    transformers 5 keeps a text encoder's saved dtype while diffusers loads UNet and VAE in fp32, so an fp16 text
    encoder failed the first prompt ('mat1 and mat2 must have the same dtype')."""
    from diffusers import StableDiffusionPipeline
    base = os.path.join(ROOT, "examples", "toy-base")
    with safe_open(os.path.join(base, "text_encoder", "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert {pipe.text_encoder.dtype, pipe.unet.dtype, pipe.vae.dtype} == {torch.float32}
    out = pipe("a red circle", num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
