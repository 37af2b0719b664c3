"""Fast tests of the pieces: image handling, buckets, losses, LoRA key layouts, config files."""
import contextlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import draw_subject
from dreambooth import data
from dreambooth.images import list_images
from dreambooth.config import UsageError, effective_config, parse_args


def test_exif_rotation_alpha_and_greyscale(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert data.load_rgb(tmp_path / "rot.jpg").size == (20, 40)

    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.save(tmp_path / "cut.png")
    loaded = data.load_rgb(tmp_path / "cut.png")
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white

    Image.new("L", (8, 8), 128).save(tmp_path / "grey.bmp")
    assert data.load_rgb(tmp_path / "grey.bmp").getpixel((3, 3)) == (128, 128, 128)

    Image.new("RGB", (12, 10), (0, 200, 0)).save(tmp_path / "leaf.webp", lossless=True)
    assert data.load_rgb(tmp_path / "leaf.webp").getpixel((5, 5)) == (0, 200, 0)
    assert list_images(tmp_path) == [str(tmp_path / n) for n in ("cut.png", "grey.bmp", "leaf.webp", "rot.jpg")]


def test_resize_and_crop_covers_target_without_distortion():
    import random
    im = Image.new("RGB", (200, 100))
    out = data.crop_with_placement(im, (64, 64), True, random.Random(0), Image.BILINEAR)[0]
    assert out.size == (64, 64)
    out = data.crop_with_placement(im, (96, 64), False, random.Random(0), Image.BILINEAR)[0]
    assert out.size == (96, 64)
    t = data.to_tensor(Image.new("RGB", (4, 2), (255, 0, 127)))
    assert t.shape == (3, 2, 4) and t[0].max() == 1 and t[1].min() == -1


def test_dataset_pairs_instance_and_class_and_reads_captions(tmp_path):
    for i in range(3):
        draw_subject(tmp_path / f"i{i}.png")
    (tmp_path / "i1.txt").write_text("a photo of sks dog on grass\n")
    cls = tmp_path / "cls"
    cls.mkdir()
    for i in range(5):
        draw_subject(cls / f"c{i}.png", shift=i)
    ds = data.DreamBoothDataset(list_images(tmp_path), "a photo of sks dog", list_images(cls),
                                "a photo of dog", resolution=64, random_flip=True)
    assert len(ds) == 5 and ds.prompts == ["a photo of sks dog", "a photo of sks dog on grass", "a photo of dog"]
    batch = data.collate([ds[0], ds[1]])
    assert batch["images"].shape == (4, 3, 64, 64)
    assert batch["prompt_ids"].tolist() == [0, 1, 2, 2]
    # same (seed, epoch, index) -> same example; with center crops only the flip varies, and it does
    assert torch.equal(ds[2]["instance"], ds[2]["instance"])
    ds.center_crop = True
    ds.start_epoch(0)
    first = ds[0]["instance"]
    outcomes = set()
    for epoch in range(1, 12):
        ds.start_epoch(epoch)
        x = ds[0]["instance"]
        assert torch.equal(x, first) or torch.equal(x, first.flip(-1))
        outcomes.add(torch.equal(x, first))
    assert outcomes == {True, False}


def test_cached_latents_replace_pixels(tmp_path):
    draw_subject(tmp_path / "a.png")
    ds = data.DreamBoothDataset(list_images(tmp_path), "p", resolution=64, random_flip=True)
    ds.cache_latents(lambda px: px[:, :1] * 2)
    variants, placements = ds.latents[(str(tmp_path / "a.png"), (64, 64))]
    assert variants.shape == (2, 1, 64, 64)
    assert torch.equal(variants[1], variants[0].flip(-1))
    assert ds[0]["instance"].shape == (1, 64, 64)
    # the 80x64 drawing is scaled to 80x64 (it covers 64x64), one seeded crop; the mirror's corner from the right
    (orig, (top, left)), (orig2, (top2, left2)) = placements
    assert orig == orig2 == (64, 80) and top == top2 == 0 and left + left2 == 80 - 64


def test_batches_carry_original_size_crop_corner_and_target():
    """SDXL's time ids: each example's size before resizing, its crop corner after, and the trained size."""
    import random as _random
    from PIL import Image as _Image
    im = _Image.new("RGB", (200, 100), "white")
    crop, (original, (top, left)) = data.crop_with_placement(im, (64, 64), True, _random.Random(0), _Image.BILINEAR)
    assert crop.size == (64, 64) and original == (100, 200) and (top, left) == (0, 32)  # 128x64 resized, centre
    draw = _Image.new("RGB", (200, 100), "white")
    draw.paste((0, 0, 0), (0, 0, 20, 100))  # a black band on the left edge
    plain, (_, (_, left)) = data.crop_with_placement(draw, (32, 32), False, _random.Random(3), _Image.NEAREST)
    flipped, (_, (_, left_f)) = data.crop_with_placement(draw, (32, 32), False, _random.Random(3), _Image.NEAREST,
                                                         flip=True)
    assert 0 < left < 32 and left_f == 64 - 32 - left  # resized to 64x32: the corner measured from the other side
    assert np.array_equal(np.asarray(flipped), np.asarray(plain)[:, ::-1])
    ds_batch = data.collate([{"instance": torch.zeros(3, 32, 32), "instance_placement": ((100, 200), (0, 5)),
                              "target_size": (32, 32), "instance_prompt_id": 0, "class": torch.zeros(3, 32, 32),
                              "class_placement": ((32, 32), (0, 0)), "class_prompt_id": 1}])
    assert ds_batch["original_sizes"].tolist() == [[100, 200], [32, 32]]
    assert ds_batch["crop_top_lefts"].tolist() == [[0, 5], [0, 0]] and ds_batch["target_sizes"].tolist() == [[32, 32]] * 2


def test_buckets_assign_every_image_without_upscaling():
    buckets = data.make_buckets(512, 256, 1024, 64)
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    for size in [(4000, 3000), (3000, 4000), (1920, 1080), (512, 512), (700, 300), (300, 300), (100, 900)]:
        w, h = data.assign_bucket(size, buckets, 64, 256)
        assert w % 64 == 0 and h % 64 == 0
        if size[0] >= 256 and size[1] >= 256:  # never larger than the photo unless below the minimum side
            assert w <= size[0] and h <= size[1], (size, (w, h))
        aspect = size[0] / size[1]
        if size[0] >= 512 and size[1] >= 512:
            assert abs(np.log((w / h) / aspect)) < 0.35
    assert data.assign_bucket((4000, 3000), buckets, 64, 256) in [(576, 448), (512, 384), (576, 384)]


def test_bucket_sampler_batches_within_one_size_and_is_reproducible(tmp_path):
    for i, size in enumerate([(300, 200), (310, 205), (200, 300), (256, 256), (320, 210)]):
        draw_subject(tmp_path / f"{i}.png", size=size)
    ds = data.DreamBoothDataset(list_images(tmp_path), "p", resolution=256, repeats=2,
                                bucket_args=(128, 512, 64))
    sampler = data.BucketBatchSampler(ds, batch_size=2, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for _, i in b) == list(range(10)) and {e for b in batches for e, _ in b} == {0}
    assert all(len({ds.size_of(i) for _, i in b}) == 1 for b in batches)
    assert list(sampler) == batches
    sampler.start_epoch(1)
    assert list(sampler) != batches and len(sampler) == len(batches)
    pixels = data.collate([ds[i] for i in batches[0]])["images"]
    w, h = ds.size_of(batches[0][0][1])
    assert pixels.shape == (2, 3, h, w)


def test_prior_preservation_loss_and_targets():
    from diffusers import DDPMScheduler
    from dreambooth.objectives import DDPMObjective
    from dreambooth.training import prior_preservation_loss
    per = torch.tensor([1.0, 3.0, 10.0, 20.0])
    assert prior_preservation_loss(per, 2, 0.5).item() == pytest.approx(2.0 + 0.5 * 15.0)
    assert prior_preservation_loss(per, 4, 0.5).item() == pytest.approx(per.mean().item())
    latents = torch.randn(2, 4, 8, 8)
    eps = DDPMScheduler(prediction_type="epsilon")
    v = DDPMScheduler(prediction_type="v_prediction")
    torch.manual_seed(0)
    noised = DDPMObjective(eps).noise(latents)
    torch.manual_seed(0)
    noise, t = torch.randn_like(latents), torch.randint(0, 1000, (2,))
    assert torch.equal(noised.timesteps, t) and torch.equal(noised.target, noise) and noised.weights is None
    assert torch.equal(noised.noisy, eps.add_noise(latents, noise, t))
    torch.manual_seed(0)
    noised = DDPMObjective(v).noise(latents)
    alpha = v.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - v.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(noised.target, alpha * noise - sigma * latents)
    t = torch.tensor([10, 900])
    w = DDPMObjective(eps, snr_gamma=5.0)._snr_weights(t)
    assert w[0] < 1 and w[1] == pytest.approx(1.0)  # high-SNR (small t) is down-weighted, low-SNR untouched


def test_kohya_keys_follow_the_ecosystem_names():
    from peft import LoraConfig
    from dreambooth.families import StableDiffusion
    from dreambooth.lora_io import kohya_state_dict
    from make_tiny_model import build_tiny_pipeline
    pipe = build_tiny_pipeline()
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_out.0"]))
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    sd = kohya_state_dict(StableDiffusion.from_pipeline(pipe), pipe.unet, [pipe.text_encoder])
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight" in sd
    assert sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"].item() == 4.0
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in sd
    assert sd["lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight"].shape == (2, 32)


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


def test_atomic_write_keeps_old_file_when_writer_crashes(tmp_path):
    from dreambooth.files import atomic_write
    target = tmp_path / "w.safetensors"
    target.write_text("good")

    def crash(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        atomic_write(str(target), crash)
    assert target.read_text() == "good" and os.listdir(tmp_path) == ["w.safetensors"]


def test_free_space_check_names_the_numbers(tmp_path):
    from dreambooth.files import check_free_space
    check_free_space(str(tmp_path / "new" / "dir"), 1, "x")
    with pytest.raises(UsageError, match=r"need .* MiB, .* MiB free"):
        check_free_space(str(tmp_path), 1 << 60, "class images")


class FakeAccelerator:
    def __init__(self, index=0, count=1):
        self.process_index, self.num_processes = index, count
        self.is_main_process = self.is_local_main_process = index == 0

    def wait_for_everyone(self):
        pass


class FakePipe:
    """Stands in for StableDiffusionPipeline: records what it was asked to make."""
    device = "cpu"

    def __init__(self, log):
        self.log = log

    def __call__(self, prompt_embeds, generator, **kw):
        self.log.append(len(generator))
        seeds = [g.initial_seed() for g in generator]
        return type("Out", (), {"images": [Image.new("RGB", (8, 8), (s % 256, 0, 0)) for s in seeds]})()


def fake_sampler(log):
    from dreambooth.priors import ClassImageSampler
    return ClassImageSampler(lambda **kw: FakePipe(log)(**kw).images, contextlib.nullcontext(), lambda prompt: {
        "prompt_embeds": torch.zeros(1, 77, 8), "negative_prompt_embeds": torch.zeros(1, 77, 8)})


def test_class_priors_generate_only_missing_and_never_mix(tmp_path, monkeypatch):
    from dreambooth import priors
    class_dir = str(tmp_path / "cls")
    os.makedirs(class_dir)
    draw_subject(os.path.join(class_dir, "mine.jpg"))  # the user's own image counts
    settings, key = priors.prior_settings("m", "a photo of dog", 25, 0, 64, "float32")
    log = []
    paths, made = priors.ensure_class_images(lambda: fake_sampler(log), class_dir, 6, settings, key, 2, FakeAccelerator())
    assert made == 5 and log == [2, 2, 1] and len(paths) == 6 and len(set(paths)) == 6
    assert os.path.join(class_dir, "mine.jpg") in paths
    manifest = [n for n in os.listdir(class_dir) if n.endswith(".json")]
    assert manifest == [f"priors-{key}.json"]
    # same settings again: nothing generated; more images asked: only the difference
    log.clear()
    assert priors.ensure_class_images(lambda: fake_sampler(log), class_dir, 6, settings, key, 2, FakeAccelerator())[1] == 0
    assert log == []
    paths, made = priors.ensure_class_images(lambda: fake_sampler(log), class_dir, 8, settings, key, 4, FakeAccelerator())
    assert made == 2 and len(set(paths)) == 8
    # other settings: the generated images of the first key are not used
    other, other_key = priors.prior_settings("m", "a photo of cat", 25, 0, 64, "float32")
    paths, made = priors.ensure_class_images(lambda: fake_sampler([]), class_dir, 3, other, other_key, 4, FakeAccelerator())
    assert made == 2 and all(key not in p for p in paths)


def test_class_priors_split_across_processes(tmp_path):
    """Both ranks count the same missing images, then each makes its share; names never collide."""
    from dreambooth import priors
    settings, key = priors.prior_settings("m", "dog", 25, 7, 64, "float32")
    made = []
    for rank in (0, 1):  # each rank sees the folder as it was before generation started
        folder = tmp_path / f"rank{rank}"
        log = []
        priors.ensure_class_images(lambda: fake_sampler(log), str(folder), 5, settings, key, 8, FakeAccelerator(rank, 2))
        made.append(sorted(n for n in os.listdir(folder) if n.endswith(".png")))
        assert log == [3 - rank]
    assert not set(made[0]) & set(made[1])
    assert sorted(made[0] + made[1]) == [f"prior-{key}-{i:05d}.png" for i in range(5)]


def test_class_priors_check_disk_space_first(tmp_path, monkeypatch):
    import shutil
    from dreambooth import priors
    monkeypatch.setattr(shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    settings, key = priors.prior_settings("m", "dog", 25, 0, 512, "float32")
    with pytest.raises(UsageError, match="not enough disk space .* for 200 class images"):
        priors.ensure_class_images(lambda: pytest.fail("generated before checking space"), str(tmp_path / "c"), 200,
                                   settings, key, 4, FakeAccelerator())


def test_checkpoint_listing_ignores_incomplete_saves(tmp_path):
    from dreambooth.checkpoints import latest, list_checkpoints
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-12.tmp", "checkpoint-x", "other"):
        os.makedirs(tmp_path / name)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["checkpoint-2", "checkpoint-10"]
    assert latest(str(tmp_path)).endswith("checkpoint-10")
    assert latest(str(tmp_path / "none")) is None


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


def test_only_lora_trains_and_stays_fp32_over_half_precision_weights():
    from argparse import Namespace
    from dreambooth import models
    from make_tiny_model import build_tiny_pipeline
    from dreambooth.families import StableDiffusion
    pipe = build_tiny_pipeline()
    unet, te = pipe.unet, pipe.text_encoder
    StableDiffusion.from_pipeline(pipe).freeze()
    unet.to(dtype=torch.bfloat16)
    te.to(dtype=torch.bfloat16)
    args = Namespace(rank=4, lora_alpha=None, lora_dropout=0.0, use_dora=False, train_text_encoder=True,
                     lora_target_modules="to_q,to_k,to_v,to_out.0")
    models.add_lora(unet, [te], args)
    for model in (unet, te):
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        assert all(p.dtype == torch.float32 for p in trainable.values())
        frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
        assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    args.lora_target_modules = "to_q,not_a_module"
    with pytest.raises(UsageError, match="--lora_target_modules: no UNet2DConditionModel module named not_a_module; "
                                         "the default for this model is to_q,to_k,to_v,to_out.0"):
        models.add_lora(build_tiny_pipeline().unet, [], Namespace(**{**vars(args), "train_text_encoder": False}))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only: restarting the peak-RSS counter")
def test_training_peak_memory_excludes_what_came_before():
    """The training peak is the true peak inside the steps (a backward pass frees its activations before the
    step ends, so sampling between steps would miss it), not a bigger one from setup (a model file mapped while
    loading); the process peak still includes that."""
    from dreambooth.report import RunStats, current_rss_mb
    stats = RunStats()
    stats.set(class_generation_seconds=0.0)
    big = np.ones(400 * 2**20 // 8)  # 400 MB during "setup"
    del big
    stats.mark_training_start()
    at_start = current_rss_mb()
    activations = np.ones(100 * 2**20 // 8)  # 100 MB inside a step, freed before it ends
    del activations
    stats.step_done()
    summary = stats.summary()
    assert at_start + 90 <= summary["train_peak_rss_mb"] <= at_start + 200
    assert summary["peak_rss_mb"] >= at_start + 350


def test_low_precision_class_generation_leaves_training_weights_untouched():
    """fp32 training weights, bf16 generation (CPU's stand-in for CUDA's fp16): generation runs under autocast
    and the weights the LoRA then trains on are bit-identical to the loaded ones."""
    from dreambooth import priors
    from dreambooth.families import StableDiffusion
    from make_tiny_model import build_tiny_pipeline
    pipe = build_tiny_pipeline()
    modules = (pipe.text_encoder, pipe.vae, pipe.unet)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    precision = priors.generation_precision(modules, "cpu", torch.float32, torch.bfloat16)
    sampler = StableDiffusion.from_pipeline(pipe).sampling_pipeline()
    with precision:
        images = sampler("a dog", num_inference_steps=2, height=64, width=64, output_type="np").images
        assert torch.is_autocast_enabled("cpu")
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    after = pipe.unet.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], before[k]) for k in before)
    # the old way (cast to the generation dtype and back) does round them: what this guards against
    pipe.unet.to(dtype=torch.bfloat16).to(dtype=torch.float32)
    assert any(not torch.equal(pipe.unet.state_dict()[k], before[k]) for k in before)
    # a lossless request is a plain cast: bf16 weights generate in fp32 without autocast
    assert not priors.generation_precision(modules, "cpu", torch.bfloat16, torch.float32)._enabled
    assert pipe.unet.dtype == torch.float32


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


def test_crops_are_fixed_only_when_caching_loses_no_augmentation(tmp_path):
    """The default --cache_latents decision: an image already of the training shape (any size, EXIF rotation
    read) has no crop to randomise; another shape does, unless crops are centred or bucketed."""
    from PIL import Image as _Image
    square, wide, turned = tmp_path / "square.png", tmp_path / "wide.png", tmp_path / "turned.jpg"
    _Image.new("RGB", (128, 128), "white").save(square)
    _Image.new("RGB", (128, 96), "white").save(wide)
    exif = _Image.Exif()
    exif[0x0112] = 6  # stored 64x128, shown 128x64
    _Image.new("RGB", (64, 128), "white").save(turned, exif=exif)
    fixed = lambda paths, **kw: data.DreamBoothDataset([str(p) for p in paths], "p", resolution=64,  # noqa: E731
                                                       **kw).crops_are_fixed()
    assert fixed([square])
    assert not fixed([square, wide])
    assert fixed([square, wide], center_crop=True)
    assert fixed([wide], bucket_args=(32, 128, 32))
    assert not fixed([turned])
    ds = data.DreamBoothDataset([str(square)], "p", [str(wide)], "c", resolution=64)  # class images count too
    assert not ds.crops_are_fixed()
