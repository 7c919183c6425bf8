"""Whether a long edit's reference latents should be re-encoded in the new clip's causal context: measured with a causal Wan VAE trained here.

A long edit under a causal VAE (Wan, Lucy Edit) starts each clip of ``1 + 4R`` reference frames
with ``1 + R`` reference latent frames. Frame 0 is the previous edit of the clip's first frame,
encoded alone, as the clip's first latent frame always is. Frames 1..R are the previous clip's
own latents, encoded in that clip's causal context; the alternative re-encodes the previous edit's reference frames
from the new clip's start, the context every latent of a training clip has.

No trained Wan VAE can be read here, so this script trains a small one (diffusers'
``AutoencoderKLWan``, 4x in time and 8x in space, 16 latent channels, as Wan2.1's) on the three
test videos (a few minutes of CPU do not make a VAE that reconstructs unseen video) and measures
on the longest, walked as a long edit at its own pace, with an identity edit (the previous clip's edit is its own
reconstruction; the new latent frames are the new clip's own encoding). It prints how far
apart the two choices put latents 1..R, and for each the PSNR of the decoded new frames
against the source (all, and the first latent frame after the references, whose frames the
causal decoder makes while it still remembers the references).

    python bench/reference_context.py                  # train (about 30 min on 2 cores), then measure
    python bench/reference_context.py --vae DIR        # measure with a VAE saved by --save, or a Wan folder's
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infer.sampling import check_causal_clip, latent_count, stream_clips  # noqa: E402
from infer.video import read_video  # noqa: E402

VIDEOS = ROOT / "tests" / "fixtures" / "videos"
TRAIN, MEASURED = ("gold-fish.mp4", "miami-surf.mp4", "car-turn.mp4"), "car-turn.mp4"
VAE = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
           latents_mean=[0.0] * 16, latents_std=[1.0] * 16)


def load(name: str, side: int) -> torch.Tensor:
    """A test video as (3, F, side, side) in [-1, 1], resized whole (its frames are square)."""
    import cv2

    frames = read_video(VIDEOS / name)
    small = np.stack([cv2.resize(f, (side, side), interpolation=cv2.INTER_AREA) for f in frames])
    return torch.from_numpy(small).permute(3, 0, 1, 2).float() / 127.5 - 1


def train_vae(steps: int, frames: int, side: int, seed: int = 0):
    """Reconstruction training (L1 on the posterior's mean) on random windows and crops of the training videos,
    each window encoded from its own start, as a training clip is."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**VAE)
    videos = [load(name, size) for name in TRAIN for size in (side, side * 3 // 2, side * 2)]
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        batch = []
        for _ in range(2):
            video = videos[int(torch.randint(len(videos), (1,), generator=g))]
            t, y, x = (int(torch.randint(n, (1,), generator=g)) for n in
                       (video.shape[1] - frames + 1, video.shape[2] - side + 1, video.shape[3] - side + 1))
            clip = video[:, t: t + frames, y: y + side, x: x + side]
            batch.append(clip.flip(1) if torch.rand(1, generator=g) < 0.5 else clip)  # both directions of motion
        x = torch.stack(batch)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mode()).sample  # an autoencoder: the posterior's noise would swamp a young encoder
        loss = (recon - x).abs().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * 0.5 * (1 + np.cos(np.pi * (step + 1) / steps))
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d}  L1 {loss.item():.4f}  {time.perf_counter() - start:.0f} s", flush=True)
    return vae.eval()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).mean().item()
    return 10 * np.log10(1 / max(mse, 1e-12))


@torch.no_grad()
def measure(vae, video: torch.Tensor, clip_frames: int, reference_frames: int) -> dict[str, list[float]]:
    """Walk ``video`` clip by clip as a long edit does and compare the two ways of making the
    reference latents 1..R at every seam."""
    encode = lambda x: vae.encode(x[None]).latent_dist.mode()  # noqa: E731
    decode = lambda z: vae.decode(z).sample[0]  # noqa: E731
    temporal = 4
    frames = [video[:, i] for i in range(video.shape[1])]
    rows: dict[str, list[float]] = {k: [] for k in ("apart", "psnr previous", "psnr re-encoded", "seam previous",
                                                     "seam re-encoded", "psnr own")}
    prev = None
    for clip, window in stream_clips(frames, clip_frames, reference_frames, temporal):
        source = torch.stack(window, 1)
        own = encode(source)  # the clip's latents from its own start, as a training clip's are
        if prev is not None:
            prev_clip, prev_latents, prev_decoded = prev
            refs = latent_count(clip.num_reference, temporal)
            offset = clip.start - prev_clip.start
            edited_refs = prev_decoded[:, offset: offset + clip.num_reference]  # the previous edit of the references
            anchor = encode(edited_refs[:, :1])
            choices = {"previous": torch.cat([anchor, prev_latents[:, :, prev_latents.shape[2] - refs + 1:]], 2),
                       "re-encoded": encode(edited_refs)}
            a, b = (z[:, :, 1:] for z in choices.values())
            rows["apart"].append(((a - b).pow(2).mean().sqrt() / b.std()).item())
            new_frames = slice(clip.num_reference, source.shape[1] - clip.padding)
            seam = slice(clip.num_reference, clip.num_reference + temporal)  # the first new latent frame's frames
            for name, z_ref in choices.items():
                decoded = decode(torch.cat([z_ref, own[:, :, refs:]], 2))
                rows[f"psnr {name}"].append(psnr(decoded[:, new_frames], source[:, new_frames]))
                rows[f"seam {name}"].append(psnr(decoded[:, seam], source[:, seam]))
            rows["psnr own"].append(psnr(decode(own)[:, new_frames], source[:, new_frames]))
        prev = (clip, own, decode(own))  # an identity edit: the clip's latents are its own encoding
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vae", type=Path, default=None,
                    help="measure with this VAE (a folder saved by --save, or a Wan / Lucy Edit folder) instead of training one")
    ap.add_argument("--save", type=Path, default=None, help="save the trained VAE here")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--clips", type=int, nargs=2, action="append", metavar=("CLIP", "REFS"),
                    help="clip and reference frames (1 + 4k each; default 17 5, 17 9, 17 13: the trained VAE's clip length)")
    args = ap.parse_args()
    clips = args.clips or [(17, 5), (17, 9), (17, 13)]
    for clip_frames, reference_frames in clips:  # before any training: a bad pair would waste it
        try:
            check_causal_clip(clip_frames, reference_frames, 4)
        except ValueError as err:
            ap.error(f"--clips: {err}")
    if args.vae is not None and not args.vae.is_dir():
        ap.error(f"--vae: no folder at {args.vae}")
    if args.vae is not None:
        from diffusers import AutoencoderKLWan

        # a Wan or Lucy Edit folder holds its VAE under vae/
        vae = AutoencoderKLWan.from_pretrained(args.vae, subfolder="vae" if (args.vae / "vae").is_dir() else None).eval()
    else:
        print(f"training a causal Wan VAE ({VAE['base_dim']} base channels, z {VAE['z_dim']}) on {', '.join(TRAIN)} "
              f"at {args.side}², {args.steps} steps")
        vae = train_vae(args.steps, 17, args.side)
        if args.save is not None:
            vae.save_pretrained(args.save)
    video = load(MEASURED, args.side * 2)
    crops = [video[:, :, y: y + args.side, x: x + args.side] for y in (0, args.side) for x in (0, args.side)]
    print(f"measured on {MEASURED}, {video.shape[1]} frames, four {args.side}² crops, identity edit")
    for clip_frames, reference_frames in clips:
        rows: dict[str, list[float]] = {}
        for crop in crops:
            for k, v in measure(vae, crop, clip_frames, reference_frames).items():
                rows.setdefault(k, []).extend(v)
        mean = {k: float(np.mean(v)) for k, v in rows.items()}
        print(f"clips of {clip_frames} frames, {reference_frames} reference frames: {len(rows['apart'])} seams; "
              f"the two choices of latents 1..R lie {mean['apart']:.3f} std apart")
        print(f"  the clip decoded from its own latents: new frames {mean['psnr own']:.2f} dB")
        for name in ("previous", "re-encoded"):
            print(f"  latents 1..R {name:10s}: new frames {mean[f'psnr {name}']:.2f} dB, "
                  f"first new latent frame {mean[f'seam {name}']:.2f} dB")
        better = sum(a > b for a, b in zip(rows["seam re-encoded"], rows["seam previous"]))
        print(f"  re-encoded better at the seam in {better} of {len(rows['seam previous'])} seams")


if __name__ == "__main__":
    main()
