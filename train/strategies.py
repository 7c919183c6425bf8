"""Sharded training of the editor: FSDP2 (``fully_shard``) over the U-Net's blocks through Lightning's ModelParallelStrategy."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

# The U-Net's blocks: each becomes one FSDP unit, gathered for its forward and freed after it.
# Frozen 2D weights and trained motion weights share a unit: FSDP2 keeps requires_grad per weight.
EDITOR_BLOCKS = ("DownBlockMotion", "CrossAttnDownBlockMotion", "UNetMidBlockCrossAttnMotion",
                 "CrossAttnUpBlockMotion", "UpBlockMotion", "WanTransformerBlock")


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def editor_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser's blocks in the order its forward runs them (FSDP units, swappable blocks)."""
    # fully_shard subclasses a block's class (FSDPWanTransformerBlock): its bases still name it
    return [m for m in denoiser.modules() if any(c.__name__ in EDITOR_BLOCKS for c in type(m).__mro__)]


def swappable_blocks(denoiser: torch.nn.Module, blocks_to_swap: int) -> list[torch.nn.Module]:
    """The denoiser's blocks (:func:`editor_blocks`), once ``model.blocks_to_swap`` is checked against them."""
    blocks = editor_blocks(denoiser)
    if not 0 <= blocks_to_swap <= len(blocks):
        raise ValueError(f"model.blocks_to_swap must be between 0 and the {len(blocks)} blocks, got {blocks_to_swap}")
    return blocks


def shard_editor(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, mesh, blocks_to_swap: int = 0) -> None:
    """``fully_shard`` each U-Net block (or DiT block), then the U-Net (its remaining weights), and the text
    encoder when it trains (its gradients must be reduced too). The frozen VAE and a frozen text
    encoder stay whole on every rank: they hold no gradients, and sharding them would only add
    all-gathers to every step.

    Block swap: the first ``blocks_to_swap`` blocks keep their shard in CPU memory (FSDP2's
    ``CPUOffloadPolicy``). Each is copied to the device for its forward, again for its backward,
    and freed after each, so at most the running block and the prefetched next one are on the
    device. Their trained weights (LoRA adapters) take their optimizer step on the CPU.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    blocks = swappable_blocks(unet, blocks_to_swap)
    # pinned memory makes the copies asynchronous; it needs an accelerator
    swapped = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for i, module in enumerate(blocks):
        fully_shard(module, mesh=mesh, offload_policy=swapped if i < blocks_to_swap else OffloadPolicy())
    fully_shard(unet, mesh=mesh)
    if text_encoder is not None:
        fully_shard(text_encoder, mesh=mesh)


class EditorFSDPStrategy(ModelParallelStrategy):
    """Fully sharded data parallelism for the editor: every process is one data-parallel rank and
    the module shards its U-Net in ``configure_model`` (:func:`shard_editor`). Checkpoints are
    one file assembled on rank 0 by default (the module keeps only trained weights, so they stay
    small); ``save_distributed_checkpoint: true`` writes one shard per rank instead.

    Runs on CUDA (NCCL) and on CPU (gloo), so the sharded path is tested without a GPU.
    ``lightning fit --trainer.strategy editor_fsdp --trainer.devices 8``, or
    ``--config configs/insv2v-fsdp.yaml``.
    """

    strategy_name = "editor_fsdp"

    def __init__(self, save_distributed_checkpoint: bool = False, **kwargs: Any):
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # sharding only: every process is a data-parallel rank
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


if EditorFSDPStrategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(EditorFSDPStrategy.strategy_name, EditorFSDPStrategy,
                              description="FSDP2 over the editor's U-Net blocks, frozen 2D weights, CUDA or CPU")
