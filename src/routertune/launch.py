"""What a process launched with others (``accelerate launch`` / ``torchrun``) does on its way out."""

from __future__ import annotations


def leave_together() -> None:
    """Waits for every launched process, then closes this one's process group; nothing when
    the process runs alone.

    A process that exits while the others still hold the group can abort in gloo's threads
    ("terminate called without an active exception", SIGABRT), which fails the whole launch
    after the work is done; the main process may still be writing results at that moment.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
