"""Aspect-ratio buckets (--bucket), the latent cache (--cache_latents) and --noise_offset."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

import train_dreambooth
from boft_diffusion.families import StableDiffusion, StableDiffusionXL
from boft_diffusion.families.denoising import DenoisingObjective
from boft_diffusion.recipes import dreambooth
from boft_diffusion.training import trainer as trainer_module
from boft_diffusion.training.data import bucket_sizes, nearest_bucket
from boft_diffusion.training.trainer import batches_per_epoch, epoch_batches, grouped_batch_indices

FAST = ["--num_inference_steps", "2", "--num_validation_images", "1", "--report_to", "none",
        "--boft_block_size", "8"]


def run_main(*flags) -> int:
    return train_dreambooth.main([*FAST, *map(str, flags)])


def test_buckets_are_on_the_latent_grid_near_the_target_area():
    sizes = bucket_sizes(1024, 64)
    assert sizes[0] == (1024, 1024)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024**2 for w, h in sizes)
    assert all(w * h >= 0.85 * 1024**2 for w, h in sizes if max(w / h, h / w) <= 2)
    assert (1152, 896) in sizes and (896, 1152) in sizes  # SDXL's usual 9:7 pair
    assert nearest_bucket(4000, 3000, sizes) == (1152, 896)
    assert nearest_bucket(3000, 4000, sizes) == (896, 1152)
    assert nearest_bucket(500, 500, sizes) == (1024, 1024)


def test_grouped_batches_come_from_one_group_and_cover_each_epoch():
    groups = [[0, 3, 5], [1, 2], [4, 6, 7, 8]]
    batches = epoch_batches(groups, 2, epoch=0, seed=1)
    assert len(batches) == 2 + 1 + 2 == batches_per_epoch(9, 2, groups)  # what --num_train_epochs counts
    assert all(any(set(batch) <= set(group) for group in groups) for batch in batches)
    assert set().union(*map(set, batches)) == set(range(9))
    per_rank = [[grouped_batch_indices(step, groups, 2, 2, rank, 1) for step in range(3)] for rank in range(2)]
    assert per_rank[0][0] == batches[0] and per_rank[1][0] == batches[1] and per_rank[0][2] == batches[4]


def write_images(folder, sizes):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (width, height) in enumerate(sizes):
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"image_{i}_{width}x{height}.png")
    return folder


def test_bucketed_training_keeps_each_images_aspect_and_batches_one_bucket(tmp_path, monkeypatch):
    folder = write_images(tmp_path / "images", [(640, 480), (480, 640), (512, 512)] * 2)
    sets, batches, time_ids = [], [], []
    real_from_folder, real_augment = dreambooth.ImageSet.from_folder.__func__, dreambooth.augment_batch

    def recording_from_folder(cls, *args, **kwargs):
        sets.append(real_from_folder(cls, *args, **kwargs))
        return sets[-1]

    def recording_augment(images, **kwargs):
        batch, crops = real_augment(images, **kwargs)
        batches.append(([tuple(image.shape[1:]) for image in images], kwargs["size"], crops))
        return batch, crops

    def recording_ids(self, originals, crops, target, device):
        time_ids.append((originals, crops, target))
        return StableDiffusionXL.size_ids(self, originals, crops, target, device)

    monkeypatch.setattr(dreambooth.ImageSet, "from_folder", classmethod(recording_from_folder))
    monkeypatch.setattr(dreambooth, "augment_batch", recording_augment)
    monkeypatch.setattr(StableDiffusion, "size_ids", recording_ids)  # SD has none: record what SDXL would get
    assert run_main("--output_dir", tmp_path / "out", "--instance_data_dir", folder, "--bucket", "--resolution", "64",
                    "--train_batch_size", "2", "--max_train_steps", "6") == 0

    (images,) = sets
    expected = {(640, 480): (48, 80), (480, 640): (80, 48), (512, 512): (64, 64)}  # file (w, h) -> target (h, w)
    assert [tuple(reversed(size)) for size in images.original_sizes] == [(640, 480), (480, 640), (512, 512)] * 2
    assert images.targets == [expected[tuple(reversed(size))] for size in images.original_sizes]
    assert images.offsets == [(0, 0)] * 6  # random crops: nothing was cropped while loading
    assert len(batches) == 6
    for shapes, target, crops in batches:
        assert len(set(shapes)) == 1, "one bucket per batch"
        height, width = shapes[0]
        # the image covers its bucket with one side exact: only the grid's leftover is cropped, never a square
        assert height == target[0] or width == target[1]
        assert all(0 <= t <= height - target[0] and 0 <= lf <= width - target[1] for t, lf in crops)
    assert {target for _, target, _ in batches} == set(expected.values())
    for originals, _, target in time_ids:
        assert all(tuple(reversed(o)) in expected and expected[tuple(reversed(o))] == target for o in originals)


def test_bucketed_prior_images_of_several_buckets_train_in_one_step(tmp_path, monkeypatch):
    """Instances of one bucket with prior images of others: one UNet pass per size, losses pooled."""
    instances = write_images(tmp_path / "images", [(640, 480)] * 2)
    classes = write_images(tmp_path / "class", [(480, 640), (512, 512)])
    shapes = []
    real_noised = DenoisingObjective.noise_pixels

    def recording_noised(self, vae, pixels, *args, **kwargs):
        shapes.append(tuple(pixels.shape))
        return real_noised(self, vae, pixels, *args, **kwargs)

    monkeypatch.setattr(DenoisingObjective, "noise_pixels", recording_noised)
    assert run_main("--output_dir", tmp_path / "out", "--instance_data_dir", instances, "--bucket", "--resolution", "64",
                    "--train_batch_size", "2", "--max_train_steps", "1", "--with_prior_preservation", "--class_data_dir",
                    classes, "--class_prompt", "a photo of star", "--num_class_images", "2") == 0
    assert sorted(shapes) == [(1, 3, 64, 64), (1, 3, 80, 48), (2, 3, 48, 80)]


def loss_curve(monkeypatch, *flags) -> tuple[list[float], int]:
    losses, encodes = [], []
    real_step, real_noised = trainer_module.Trainer._micro_step, DenoisingObjective.noise_pixels

    def recording_step(self, micro, last):
        logs = real_step(self, micro, last)
        losses.append(logs["loss"])
        return logs

    def counting_noised(*args, **kwargs):
        encodes.append(1)
        return real_noised(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module.Trainer, "_micro_step", recording_step)
        patch.setattr(DenoisingObjective, "noise_pixels", counting_noised)
        assert run_main(*map(str, flags)) == 0
    return losses, len(encodes)


def test_cached_latents_give_the_uncached_loss_curve(tmp_path, monkeypatch):
    common = ["--center_crop", "--max_train_steps", "4", "--train_batch_size", "2", "--with_prior_preservation",
              "--class_data_dir", tmp_path / "class", "--class_prompt", "a photo of star", "--num_class_images", "2",
              "--seed", "5", "--noise_offset", "0.05"]
    plain, plain_encodes = loss_curve(monkeypatch, "--output_dir", tmp_path / "plain", *common)
    cached, cached_encodes = loss_curve(monkeypatch, "--output_dir", tmp_path / "cached", *common, "--cache_latents")
    assert plain_encodes == 4 and cached_encodes == 0
    assert len(plain) == len(cached) == 4
    assert np.allclose(plain, cached, rtol=1e-4, atol=1e-6), (plain, cached)


@pytest.mark.parametrize("flags", [["--cache_latents"], ["--cache_latents", "--center_crop", "--random_flip"]])
def test_cache_latents_refuses_random_crops_and_flips(tmp_path, capsys, flags):
    assert run_main("--output_dir", tmp_path / "out", "--max_train_steps", "1", *flags) == 2
    assert "--cache_latents encodes each image once" in capsys.readouterr().err


def test_noise_offset_shifts_each_channel_of_the_noise():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler()
    mean, std = torch.randn(2, 4, 8, 8), torch.rand(2, 4, 8, 8)

    def noised(offset):
        return DenoisingObjective(scheduler, 0.18).noise_posterior(mean, std, torch.Generator().manual_seed(3), "cpu",
                                                                   offset)

    plain, offset = noised(0.0), noised(0.1)
    replay = torch.Generator().manual_seed(3)
    torch.randn(mean.shape, generator=replay)  # the posterior sample
    noise = torch.randn(mean.shape, generator=replay)
    shift = torch.randn(2, 4, 1, 1, generator=replay)
    assert torch.equal(plain.noise, noise) and torch.equal(plain.latents, offset.latents)
    assert torch.allclose(offset.noise, noise + 0.1 * shift)
    assert math.isclose(float((offset.noise - plain.noise).std(dim=(2, 3)).max()), 0.0, abs_tol=1e-6)
