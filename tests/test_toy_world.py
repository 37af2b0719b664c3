"""The toy world: its pixel scorer reads what it drew, its captions are what the base model was taught, and a
short run with the recommended recipe on the shipped base teaches the striped subject without drifting the class."""
import itertools
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

import toy_world as world
from conftest import ROOT, run_script

TOY_BASE = os.path.join(ROOT, "examples", "toy-base")


def test_scorer_reads_every_drawn_combination():
    rng = np.random.default_rng(0)
    for shape, colour, bg in itertools.product(world.SHAPES, world.COLOURS, world.BACKGROUNDS):
        for _ in range(2):
            c = world.classify(world.draw_object(shape, colour, bg, rng))
            assert (c["shape"], c["colour"], c["background"], c["plain"], c["subject"]) == (shape, colour, bg, True,
                                                                                           False)
    for bg in world.BACKGROUNDS:
        c = world.classify(world.draw_subject(bg, rng))
        assert c["subject"] and c["shape"] == "circle" and c["background"] == bg and c["plain"]
    empty = world.classify(Image.new("RGB", (32, 32), world.BACKGROUNDS["gray"]))
    assert empty == {"background": "gray", "plain": True, "shape": None, "colour": None, "subject": False}


def test_stripes_filling_the_frame_are_no_background():
    """Blue and yellow stripes edge to edge: the pattern is there, but the border's median is gray-ish and the
    border is no plain colour, so a LoRA that paints stripes everywhere does not score "on a gray background"."""
    big = Image.new("RGB", (128, 128))
    d = ImageDraw.Draw(big)
    for k, y in enumerate(range(0, 128, 16)):
        d.rectangle((0, y, 127, y + 15), fill=world.COLOURS[world.SUBJECT_STRIPES[k % 2]])
    c = world.classify(big.resize((32, 32), Image.BOX))
    assert c["background"] == "gray" and not c["plain"]
    assert world.score({"recontext": [(big.resize((32, 32), Image.BOX), "gray")]}) == {"recontext": 0.0}


def test_two_colours_without_stripes_are_not_the_subject():
    """Half blue, half yellow, or a blue circle with one yellow band: both colours, not the striped pattern."""
    big = Image.new("RGB", (128, 128), world.BACKGROUNDS["white"])
    d = ImageDraw.Draw(big)
    d.pieslice((16, 16, 111, 111), 180, 360, fill=world.COLOURS["blue"])
    d.pieslice((16, 16, 111, 111), 0, 180, fill=world.COLOURS["yellow"])
    assert not world.classify(big.resize((32, 32), Image.BOX))["subject"]
    big = Image.new("RGB", (128, 128), world.BACKGROUNDS["black"])
    d = ImageDraw.Draw(big)
    d.ellipse((16, 16, 111, 111), fill=world.COLOURS["blue"])
    d.rectangle((16, 56, 111, 72), fill=world.COLOURS["yellow"])
    assert not world.classify(big.resize((32, 32), Image.BOX))["subject"]


def test_score_numbers():
    rng = np.random.default_rng(1)
    subjects = [world.draw_subject("white", rng) for _ in range(4)]
    circles = [world.draw_object("circle", "red", "white", rng) for _ in range(3)] + [subjects[0]]
    n = world.score({"instance": subjects[:3] + circles[:1],
                     "recontext": [(world.draw_subject("black", rng), "black"), (world.draw_subject("gray", rng), "black")],
                     "class": circles})
    assert n == {"fidelity": 0.75, "recontext": 0.5, "drift": 0.25, "class_ok": 0.75}


def test_shipped_subject_photos_are_what_the_world_draws(tmp_path):
    """examples/toy_subject is write_subject_images' output, byte for byte: the striped circle on white and gray,
    each photo with a caption naming its background; black is left for the recontextualisation prompt."""
    world.write_subject_images(tmp_path)
    shipped = os.path.join(ROOT, "examples", "toy_subject")
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(shipped))
    for name in os.listdir(tmp_path):
        if name.endswith(".png"):
            assert np.array_equal(np.asarray(Image.open(tmp_path / name)), np.asarray(Image.open(os.path.join(shipped, name))))
        else:
            assert (tmp_path / name).read_text() == open(os.path.join(shipped, name)).read()
    bgs = [world.classify(Image.open(tmp_path / f"striped_circle_{k}.png"))["background"] for k in range(5)]
    assert bgs == list(world.SUBJECT_PHOTO_BACKGROUNDS) and "black" not in bgs
    assert (tmp_path / "striped_circle_1.txt").read_text() == "a sks circle on a gray background\n"
    world.write_subject_images(tmp_path / "bare", captions=False)
    assert not [n for n in os.listdir(tmp_path / "bare") if n.endswith(".txt")]


def test_captions_leave_attributes_out_and_hold_out_combinations():
    pairs = world.training_pairs(3000, seed=7)
    captions = [c for _, c in pairs]
    held = {world.prompt(*combo) for combo in world.HELD_OUT}
    assert not held & set(captions)
    assert "a circle" in captions and "a red circle" in captions and "a circle on a white background" in captions
    assert 0.07 < captions.count("") / len(captions) < 0.13  # the unconditional branch for guidance
    again = world.training_pairs(50, seed=7)
    assert [c for _, c in again] == captions[:50]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (a, _), (b, _) in zip(again, pairs[:50]))
    # Every caption is about the image: the scorer reads back what the caption names.
    for im, cap in pairs[:200]:
        if cap:
            c = world.classify(im)
            assert c["shape"] in cap.split() and (c["colour"] in cap.split() or not set(world.COLOURS) & set(cap.split()))


def test_shipped_base_loads_as_is():
    import torch
    from diffusers import StableDiffusionPipeline

    sizes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(TOY_BASE) for f in fs)
    assert sizes <= 20 * 2 ** 20
    from safetensors import safe_open
    with safe_open(os.path.join(TOY_BASE, "unet", "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # committed in fp16
    pipe = StableDiffusionPipeline.from_pretrained(TOY_BASE, torch_dtype=torch.float32)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    ids = pipe.tokenizer("a sks red circle on a gray background").input_ids
    assert len(ids) == 10  # one token per word plus start/end: every demo word is in the vocabulary


@pytest.mark.slow
def test_recommended_recipe_learns_the_subject_and_keeps_the_class(tmp_path):
    """The recipe of make demo, as it is: the instance prompt draws the striped circle, the class prompt does not
    (the base draws it in none of them), and the class prompt's images stay the base's on most seeds (prior
    preservation from the base's own output; no class images are written). The run is pivotal tuning, so the scorer
    loads its tokens (demo_grids.score_lora)."""
    import demo_grids
    out = tmp_path / "run"
    r = run_script("train_dreambooth_lora.py", "--config", os.path.join(ROOT, "examples", "recipes", "toy_demo.yaml"),
                   "--output_dir", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isfile(out / "run_emb.safetensors") and not (out / "class_images").exists()
    pipe = demo_grids.load_pipeline(TOY_BASE)
    base, base_images = demo_grids.score_lora(pipe, None, 8, class_images=32)
    lora, _ = demo_grids.score_lora(pipe, str(out), 8, base_images=base_images, class_images=32)
    assert base["fidelity"] == 0.0 and base["recontext"] == 0.0 and base["drift"] == 0.0
    # training seed 0 on the 2-core machine: fidelity 1.00, recontext 0.12, class prior changed 0.31 of 32 seeds
    # (50 class images at the previous recipe's rate: 0.62); five seeds in docs/quality.md
    assert lora["fidelity"] >= 0.5, lora
    assert lora["recontext"] > 0, lora
    assert lora["drift"] <= 0.15, lora
    assert lora["prior_change"] <= 0.45 and lora["colours"] >= 5 and lora["backgrounds"] == 3, lora
    # Unloaded again: the same pipeline gives the base's images afterwards (bench_toy scores many runs on one).
    assert demo_grids.score_lora(pipe, None, 8, class_images=32)[0] == base
    with open(out / "config.yaml") as f:
        assert "prior_preservation_mode: base_output" in f.read()
    assert "| learning rate | 0.0025 (constant); text encoder / new tokens 0.02 |" in open(out / "README.md").read()


def test_class_prior_counts_seeds_whose_colour_or_background_moved():
    """The class prior's numbers (the DreamBooth paper's PRES and DIV, read from pixels): seed by seed against the
    base's image, a changed colour or background counts once; the variety is over the run's own images."""
    rng = np.random.default_rng(1)
    base = [world.draw_object("circle", c, bg, rng) for c, bg in
            (("red", "white"), ("blue", "gray"), ("green", "black"), ("yellow", "white"))]
    lora = [world.draw_object("circle", c, bg, rng) for c, bg in
            (("red", "white"), ("blue", "black"), ("orange", "black"), ("yellow", "white"))]
    assert world.class_prior(base, lora) == {"prior_change": 0.5, "colours": 4.0, "backgrounds": 2.0}
    assert world.class_prior(base, base) == {"prior_change": 0.0, "colours": 4.0, "backgrounds": 3.0}


def test_demo_grids_samples_the_class_prompt_on_more_seeds(monkeypatch):
    """bench_toy's --class_images: the class prompt on its own number of seeds, every other prompt on num_images,
    each image seeded on its own (the same seed gives the same image whatever the counts)."""
    import demo_grids
    calls = []
    monkeypatch.setattr(world, "generate", lambda pipe, prompts, seeds: calls.append((prompts, seeds)) or
                        [f"{p}|{s}" for p, s in zip(prompts, seeds)])
    out = demo_grids.sample_all(None, 2, class_images=5)
    assert out[demo_grids.CLASS] == [f"{demo_grids.CLASS}|{k}" for k in range(5)]
    assert all(out[p] == [f"{p}|0", f"{p}|1"] for p in demo_grids.PROMPTS if p != demo_grids.CLASS)
    assert len(calls) == 1 and len(calls[0][0]) == 2 * (len(demo_grids.PROMPTS) - 1) + 5
