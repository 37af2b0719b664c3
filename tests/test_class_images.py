"""Class images for prior preservation (dreambooth/priors.py): only the missing ones are generated, never mixed
with those of other settings, split across processes without name clashes, disk space checked first; generation in
a lower precision runs under autocast and leaves the training weights bit-identical. A fake pipeline and
accelerator stand in where the model does not matter; the tiny SD pipeline where it does."""
import contextlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import draw_subject
from dreambooth.errors import UsageError


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

