"""Latent diffusion through a local VAE: the cache is built once, reused, invalidated on change,
and the sampler draws fresh posterior samples reproducibly."""

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ditkit.data.images import DataError, ImageDataset  # noqa: E402
from ditkit.data.latents import LatentBatchSampler, build_latent_cache, open_latent_cache  # noqa: E402
from ditkit.interop import InteropError, load_vae  # noqa: E402


def save_tiny_vae(folder, seed=0, scaling_factor=0.18215):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=scaling_factor,
    )
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


def dataset(n=6, size=16, channels=3, seed=0, labelled=True):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 3 if labelled else None
    return ImageDataset(images, labels, 3 if labelled else 0, ["a", "b", "c"] if labelled else [], "test")


class CountingVAE:
    """Wraps a LatentVAE and counts encoder calls."""

    def __init__(self, vae):
        self.vae, self.calls = vae, 0
        self.fingerprint, self.downsample, self.latent_channels = vae.fingerprint, vae.downsample, vae.latent_channels

    def encode_moments(self, x):
        self.calls += 1
        return self.vae.encode_moments(x)

    def describe(self):
        return self.vae.describe()


def test_vae_scaling_comes_from_its_config(tmp_path):
    vae = load_vae(save_tiny_vae(tmp_path / "v", scaling_factor=0.5))
    assert (vae.scaling_factor, vae.downsample, vae.latent_channels) == (0.5, 4, 4)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = vae.encode_moments(x)
    raw = vae.vae.encode(x).latent_dist
    torch.testing.assert_close(mean, raw.mean * 0.5)
    torch.testing.assert_close(std, raw.std * 0.5)
    decoded = vae.decode(mean)
    torch.testing.assert_close(decoded, vae.vae.decode(raw.mean).sample.clamp(-1, 1))
    with pytest.raises(InteropError, match="multiple of the VAE downsampling factor 4"):
        vae.latent_size(18)
    with pytest.raises(InteropError, match="AutoencoderKL folder"):
        load_vae(tmp_path / "nowhere")


def test_cache_holds_moments_of_both_flip_variants_and_is_reused(tmp_path, vae_dir):
    vae = CountingVAE(load_vae(vae_dir))
    data = dataset()
    cache = build_latent_cache(data, vae, tmp_path / "cache", hflip=True, batch_size=4)
    assert not cache.reused and vae.calls == 2 * 2  # two batches x two variants
    assert cache.mean.shape == (6, 2, 4, 4, 4) and cache.latent_shape == (4, 4, 4)
    x = data.images.float() / 127.5 - 1
    mean, std = vae.vae.encode_moments(x)
    flipped_mean, _ = vae.vae.encode_moments(x.flip(-1))
    torch.testing.assert_close(torch.from_numpy(cache.mean[:, 0].copy()), mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(cache.std[:, 0].copy()), std, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(cache.mean[:, 1].copy()), flipped_mean, atol=1e-6, rtol=1e-5)
    assert torch.equal(cache.labels, data.labels)
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["vae"]["scaling_factor"] == pytest.approx(0.18215) and meta["hflip"] is True

    calls = vae.calls
    again = build_latent_cache(data, vae, tmp_path / "cache", hflip=True, batch_size=4)
    assert again.reused and again.path == cache.path and vae.calls == calls  # nothing re-encoded
    assert open_latent_cache(data, vae, tmp_path / "cache", hflip=True).path == cache.path


def test_cache_is_invalidated_by_data_vae_image_size_and_flips(tmp_path, vae_dir):
    vae = load_vae(vae_dir)
    data = dataset()
    base = build_latent_cache(data, vae, tmp_path / "cache")
    changed = dataset()
    changed.images[0, 0, 0, 0] ^= 1  # one pixel
    relabelled = dataset()
    relabelled.labels[0] = 2
    other_vae = load_vae(save_tiny_vae(tmp_path / "other_vae", seed=1))
    variants = [
        (changed, vae, False),
        (relabelled, vae, False),
        (dataset(size=32), vae, False),
        (data, other_vae, False),
        (data, vae, True),
    ]
    paths = {base.path}
    for d, v, flip in variants:
        assert open_latent_cache(d, v, tmp_path / "cache", hflip=flip) is None
        built = build_latent_cache(d, v, tmp_path / "cache", hflip=flip)
        assert not built.reused
        paths.add(built.path)
    assert len(paths) == 1 + len(variants)


def test_sampler_draws_fresh_posterior_samples_and_resumes_exactly(tmp_path, vae_dir):
    cache = build_latent_cache(dataset(n=8), load_vae(vae_dir), tmp_path / "cache", hflip=True)
    sampler = LatentBatchSampler(cache, batch_size=4, seed=3, hflip=True)
    batches = [sampler.next_batch() for _ in range(4)]  # two epochs
    z, y = batches[0]
    assert z.shape == (4, 4, 4, 4) and y.dtype == torch.int64
    # Epoch 1 sees the same items in another order with new noise: the sample sets differ.
    assert not torch.allclose(torch.cat([b[0] for b in batches[:2]]).sum(0), torch.cat([b[0] for b in batches[2:]]).sum(0))
    # A draw is mean + std * noise around the stored mean of its (item, variant).
    means = torch.from_numpy(cache.mean.copy()).flatten(2)
    stds = torch.from_numpy(cache.std.copy()).flatten(2)
    for zi in z.flatten(1):
        scores = ((zi - means) / stds).square().mean(-1)  # per (item, variant) standardised distance
        assert 0.3 < scores.min() < 3.0  # one stored posterior, at its own noise scale (not its mean)

    resumed = LatentBatchSampler(cache, batch_size=4, seed=3, hflip=True)
    resumed.load_state_dict(sampler.state_dict() | {"epoch": 1, "position": 0})
    torch.testing.assert_close(resumed.next_batch()[0], batches[2][0], atol=0, rtol=0)

    mean_only = LatentBatchSampler(cache, batch_size=4, seed=3, sample_posterior=False)
    z0, _ = mean_only.next_batch()
    flat = torch.from_numpy(cache.mean[:, 0].copy()).flatten(1)
    for zi in z0.flatten(1):
        assert (flat - zi).abs().amax(-1).min() == 0  # exactly a stored unflipped mean


def test_flips_need_a_flip_cache_and_grayscale_goes_through_rgb(tmp_path, vae_dir):
    vae = load_vae(vae_dir)
    cache = build_latent_cache(dataset(channels=1, labelled=False), vae, tmp_path / "cache")
    assert cache.labels is None and cache.mean.shape[1] == 1
    with pytest.raises(DataError, match="hflip=True"):
        LatentBatchSampler(cache, batch_size=2, hflip=True)
    z, y = LatentBatchSampler(cache, batch_size=2).next_batch()
    assert y is None and z.shape == (2, 4, 4, 4)


def test_tiny_latent_space_training_run_end_to_end(tmp_path, vae_dir):
    """Cache -> DiT on latents with the Gaussian objective -> DDIM sampling -> VAE decode.
    (ditkit.train.loop does not read latent caches yet; this drives the pieces directly.)"""
    from ditkit.diffusion import GaussianDiffusion, make_schedule, space_timesteps
    from ditkit.models.dit import build_dit
    from ditkit.samplers import ddim

    torch.manual_seed(0)
    vae = load_vae(vae_dir)
    cache = build_latent_cache(dataset(n=16), vae, tmp_path / "cache", hflip=True)
    c, h, _ = cache.latent_shape
    model = build_dit("DiT-T/2", input_size=h, in_channels=c, num_classes=cache.num_classes, learn_sigma=True)
    objective = GaussianDiffusion(make_schedule("linear", 1000), learn_sigma=True)
    sampler = LatentBatchSampler(cache, batch_size=8, seed=0, hflip=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    noise = torch.Generator().manual_seed(1)
    losses = []
    model.train()
    for _ in range(40):
        z, y = sampler.next_batch()
        loss = objective.loss(model, z, y, generator=noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), losses

    model.eval()
    y = torch.tensor([0, 2])
    denoiser = objective.denoiser(lambda x, t: model(x, t, y))
    x_T = torch.randn(2, c, h, h, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z0 = ddim(denoiser, x_T, objective.alphas_cumprod, space_timesteps(1000, 10))
    images = vae.decode(z0)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1.0 and torch.isfinite(images).all()
