"""Train the tiny bundle's VAE: a small AutoencoderKLWan that really reconstructs the synthetic shapes.

    python examples/tiny/train_vae.py [--output_dir examples/tiny/vae] [--steps 800]

A random VAE cannot show that the pipeline learns: whatever the DiT generates decodes to a grey blur. This trains
the Wan2.1 architecture at toy width (base_dim 16, 16 latent channels, 8x spatial downsampling, as the real one) on
freshly drawn images of make_assets.py's classes, plain reconstruction loss on the posterior mean, and stores the
latents' per-channel mean and std as the normalisation constants, as the real Wan2.1 config does for real data.
The result (about 1 MB) is committed in examples/tiny/vae/ so that make_assets.py takes seconds; this script
rebuilds it deterministically (about 6 minutes on 2 CPU cores).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZE = (64, 64)


def new_vae():
    from diffusers import AutoencoderKLWan
    return AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def shape_images(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 1, 64, 64) in [-1, 1]: make_assets.py's classes, alternating, drawn and resized as training sees them."""
    from make_assets import CLASSES, draw_sample

    from cosmos_t2i.data import resize_image
    rng = np.random.default_rng(seed)
    drawn = [np.asarray(draw_sample(CLASSES[i % len(CLASSES)], rng)) for i in range(n)]
    return torch.stack([resize_image(torch.from_numpy(a).permute(2, 0, 1), SIZE) for a in drawn]).unsqueeze(2)


@torch.no_grad()
def reconstruction_mse(vae, images: torch.Tensor) -> float:
    return (vae.decode(vae.encode(images).latent_dist.mean).sample - images).pow(2).mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(Path(__file__).parent / "vae"))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--images", type=int, default=64, help="training images (half of each class)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    from tqdm import tqdm

    torch.manual_seed(0)
    vae, images = new_vae(), shape_images(args.images, seed=1)
    optimizer = torch.optim.Adam(vae.parameters(), lr=args.lr)
    decay_from = int(0.7 * args.steps)  # constant, then linear to 0 over the last 30%
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 1.0 if s < decay_from else (args.steps - s) / (args.steps - decay_from))
    bar = tqdm(range(args.steps), desc="tiny VAE")
    for _ in bar:
        batch = images[torch.randperm(len(images))[:args.batch_size]]
        loss = (vae.decode(vae.encode(batch).latent_dist.mean).sample - batch).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(mse=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        mu = vae.encode(images).latent_dist.mean
    vae.register_to_config(latents_mean=mu.mean(dim=(0, 2, 3, 4)).tolist(),
                           latents_std=mu.std(dim=(0, 2, 3, 4)).clamp_min(1e-3).tolist())
    vae.save_pretrained(args.output_dir)
    print(f"reconstruction MSE on unseen images: {reconstruction_mse(vae, shape_images(16, seed=2)):.4f} "
          f"(pixels in [-1, 1]); saved to {args.output_dir}")


if __name__ == "__main__":
    main()
