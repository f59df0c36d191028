"""What a merge takes from mergekit's options besides the recipe: the one place that
decides their defaults (the device, the seed)."""

import dataclasses
from dataclasses import dataclass

import torch

from mergekit_prodistill.errors import ProDistillError
from mergekit_prodistill.parallel import World

DEFAULT_DEVICE = "cpu"  # mergekit's --cuda sets "cuda"
DEFAULT_SEED = 0


@dataclass(frozen=True)
class RunContext:
    device: torch.device
    seed: int
    trust_remote_code: bool
    quiet: bool

    @classmethod
    def of(cls, options) -> "RunContext":
        """From mergekit's ``MergeOptions``; a device torch does not know is refused."""
        seed = options.random_seed if options.random_seed is not None else DEFAULT_SEED
        try:
            device = torch.device(options.device or DEFAULT_DEVICE)
        except RuntimeError:
            raise ProDistillError(
                f"--device {options.device}: not a device torch knows; use cpu, cuda or "
                "cuda:N (or --cuda)") from None
        return cls(device, seed, options.trust_remote_code, options.quiet)

    def in_world(self, world: World) -> "RunContext":
        """This process's context: under ``torchrun`` each process has its own GPU."""
        return dataclasses.replace(self, device=world.device) if world.distributed else self
