"""dreambooth/data.py: what a training example is. Crops that cover the target without distortion and remember
where they were taken (SDXL's time ids), flips, buckets that never upscale, the dataset pairing instance and class
images with their captions, the bucket sampler's reproducible batches, the latent cache and when crops are fixed
enough to cache. No model is needed: images are drawn here."""
import numpy as np
import torch
from PIL import Image

from conftest import draw_subject
from dreambooth import data
from dreambooth.images import list_images


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

