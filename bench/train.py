"""Training benchmark: clips/s and peak memory of a training step, data-loader throughput, and on a
GPU the SD 1.5-size step time and MFU against the reference recipe.

    python bench/train.py                      # tiny editor on CPU + loader with 2 workers
    python bench/train.py --sd --device cuda   # SD 1.5 size, 16x256², bf16 vs the reference recipe
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from model import set_trainable, shipped_config  # noqa: E402
from train import EditorModule, ShardDataModule  # noqa: E402


def fake_batch(batch: int, frames: int, resolution: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    video = lambda: (torch.rand(batch, 3, frames, resolution, resolution, generator=g) * 2 - 1).to(device)  # noqa: E731
    return {"source": video(), "target": video(), "instruction": ["make it snowy"] * batch}


def time_steps(module: EditorModule, batch: dict, iters: int, precision: str, device) -> tuple[float, float]:
    """Median seconds per optimizer step (forward, backward, AdamW) and total FLOPs of one step."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        with autocast:
            loss = module.loss(batch, torch.Generator(device=device).manual_seed(0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    sync()
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), counter.get_total_flops()


def loader_throughput(workers: int, batches: int, frames: int, resolution: int) -> float:
    from shards import write_shards

    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp), 16, per_shard=4, frames=16, size=64)
        dm = ShardDataModule(shards=tmp, num_frames=frames, resolution=resolution, batch_size=4, num_workers=workers,
                             batches_per_epoch=batches, shuffle_buffer=8)
        dm.setup("fit")
        it = iter(dm.train_dataloader())
        next(it)  # worker start-up
        start = time.perf_counter()
        clips = sum(len(b["instruction"]) for b in it)
        return clips / (time.perf_counter() - start)


def tiny_cpu(args) -> None:
    device = torch.device("cpu")
    module = EditorModule(editor="tiny", trainable="all")
    batch = fake_batch(args.batch, args.frames, 32, device)
    seconds, flops = time_steps(module, batch, args.iters, "32-true", device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step_rate = args.batch / seconds
    print(f"tiny CPU train step: batch {args.batch} x {args.frames} frames at 32px: {seconds * 1e3:.0f} ms/step, "
          f"{step_rate:.2f} clips/s, {flops / 1e9:.1f} GFLOP/step, peak RSS {rss:.0f} MiB")
    loader = loader_throughput(args.workers, 10, args.frames, 32)
    print(f"data loader ({args.workers} workers, mp4 decode + motion augmentation): {loader:.1f} clips/s "
          f"= {loader / step_rate:.1f}x what a training step consumes")


def sd_gpu(args) -> None:
    device = torch.device(args.device)
    config = shipped_config("model/sd15-random.yaml")
    batch = fake_batch(args.batch, 16, 256, device)
    rows = []
    for label, precision, trainable, checkpointing, frozen_grads in (
        ("this recipe: bf16-mixed, motion only", "bf16-mixed", "motion", args.checkpointing, False),
        ("reference: fp32, grads on frozen 2D", "32-true", "motion", False, True),
    ):
        module = EditorModule(editor=config, trainable=trainable, gradient_checkpointing=checkpointing).to(device)
        if frozen_grads:  # the reference left requires_grad on the 2D weights but only stepped motion
            set_trainable(module.unet, "all")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds, flops = time_steps(module, batch, args.iters, precision, device)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        rows.append((label, seconds, flops, peak))
        del module
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"SD 1.5 size, batch {args.batch} x 16 frames at 256², {device}")
    for label, seconds, flops, peak in rows:
        mfu = flops / seconds / (args.peak_tflops * 1e12)
        print(f"  {label:40s} {seconds * 1e3:8.0f} ms/step  {args.batch / seconds:6.2f} clips/s  "
              f"MFU {mfu:.1%}  peak {peak:.1f} GiB")
    print(f"  speed-up over the reference: x{rows[1][1] / rows[0][1]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sd", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device peak bf16 dense TFLOP/s (H100 SXM: 989)")
    args = ap.parse_args()
    sd_gpu(args) if args.sd else tiny_cpu(args)


if __name__ == "__main__":
    main()
