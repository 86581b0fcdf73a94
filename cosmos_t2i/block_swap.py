"""Block swap: the frozen weights of the DiT's last N blocks live in pinned host memory, and two GPU slots take them
in turn, each block copied in on a side stream while the block before it computes.

Only frozen parameters move (a LoRA's base, a sampler's whole block); trainable ones (LoRA A/B) stay on the GPU, so
the optimizer never sees a swap. The last blocks are the swapped ones: the first, resident blocks hide the first
copy in the forward pass, and the backward pass starts on the block the forward pass ended with, still in its slot.

Training needs activation checkpointing on the swapped blocks (checkpoint_swapped_blocks, or all blocks):
autograd would otherwise keep each block's weights alive from its forward to its backward, which is what swapping
gives back. With checkpointing the backward pass recomputes each block in reverse order, so the same pre-forward
hook fetches the blocks downwards, one ahead.

A slot is reused only after every kernel that reads its previous block has been queued on the compute stream: the
copy stream waits on the compute stream first, so a copy never overtakes a read. Results are bit-identical to the
model without swapping (tests/test_block_swap.py); on the CPU the same bookkeeping runs with plain copies.
"""

import torch

ALL = "all"


def flag_value(text: str) -> str:
    """argparse type of --blocks_to_swap: a number of blocks, or `all`."""
    if str(text).lower() == ALL or str(text).isdigit():
        return str(text).lower()
    import argparse
    raise argparse.ArgumentTypeError(f"give a number of blocks or '{ALL}', not {text!r}")


def requested(value) -> bool:
    """Whether --blocks_to_swap asks for any swapping (a count above 0, or `all`)."""
    return value is not None and (str(value).lower() == ALL or (str(value).isdigit() and int(value) > 0))


def blocks_to_swap(value, num_blocks: int) -> int:
    """--blocks_to_swap N or `all` -> how many of the model's blocks to swap (0..num_blocks)."""
    if not requested(value):
        return 0
    if str(value).lower() == ALL:
        return num_blocks
    count = int(value)
    if not 0 <= count <= num_blocks:
        raise ValueError(f"--blocks_to_swap {value}: the model has {num_blocks} blocks; give 0 to {num_blocks} or "
                         f"'{ALL}'.")
    return count


class BlockSwap:
    """Swaps the frozen weights of `model.transformer_blocks[-count:]`; see the module's docstring.

    `prepare_block(block)`, if given, runs on each swapped block after it is moved to `device` and before its weights
    go to host memory (the float8 storage of a LoRA base converts there, one block at a time on the GPU).
    """

    SLOTS = 2

    def __init__(self, model, count: int, device, prepare_block=None):
        self.model, self.device = model, torch.device(device)
        blocks = model.transformer_blocks
        self.num_blocks, self.first = len(blocks), len(blocks) - count
        self.on_cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self.params, self.host, self.buffers = {}, {}, []
        self.misses = 0  # blocks fetched when needed rather than ahead: the first of a run only, unless a bug
        for index in range(self.first, self.num_blocks):
            block = blocks[index]
            if prepare_block is not None:
                prepare_block(block.to(self.device))
            self.params[index] = [p for p in block.parameters() if not p.requires_grad]
            self.host[index] = self._to_host(self.params[index])
            for p in self.params[index]:
                p.data = self._placeholder(p.dtype)
        layout = {i: [(h.shape, h.dtype) for h in host] for i, host in self.host.items()}
        if len({str(v) for v in layout.values()}) > 1:
            raise ValueError("--blocks_to_swap needs blocks of one layout, and the swapped blocks' frozen weights "
                             "differ: swap fewer blocks (the last ones alike).")
        template = self.host.get(self.first, [])
        self.slots = [[torch.empty(h.shape, dtype=h.dtype, device=self.device) for h in template]
                      for _ in range(self.SLOTS if count else 0)]
        self.slot_block = [None] * len(self.slots)
        self.ready = [torch.cuda.Event() if self.on_cuda else None for _ in self.slots]
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(self._hook(i))

    def _to_host(self, params) -> list[torch.Tensor]:
        """One block's frozen weights as views of one host buffer of their exact size. On CUDA the buffer is pinned
        by registering it (torch's pinned allocator rounds each allocation up to a power of two: about 28% more host
        memory for 14B's projections), or with pin_memory() where registering fails."""
        sizes = [p.numel() * p.element_size() for p in params]
        starts = [sum(-(-n // 256) * 256 for n in sizes[:i]) for i in range(len(sizes))]  # 256-byte aligned
        buffer = torch.empty(starts[-1] + sizes[-1] if sizes else 0, dtype=torch.uint8)
        if self.on_cuda and buffer.numel():
            if int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)) != 0:
                buffer = buffer.pin_memory()
        self.buffers.append(buffer)
        views = [buffer[a:a + n].view(p.dtype).view(p.shape) for a, n, p in zip(starts, sizes, params)]
        for view, p in zip(views, params):
            view.copy_(p.data)
        return views

    def _placeholder(self, dtype) -> torch.Tensor:
        """What a swapped-out weight holds: nothing, so a use of an absent block fails loudly instead of silently."""
        return torch.empty(0, dtype=dtype, device=self.device)

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for slot in self.slots for t in slot)

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for host in self.host.values() for t in host)

    def _hook(self, index: int):
        @torch.compiler.disable  # the hook runs eagerly; a compiled block's graph starts after it
        def before_block(module, args):
            self.before_block(index)
        return before_block

    def before_block(self, index: int) -> None:
        backward = torch._C._current_graph_task_id() != -1  # a checkpointed block recomputed in the backward pass
        if (index >= self.first and torch.is_grad_enabled() and not backward
                and not getattr(self.model, "gradient_checkpointing", False)):
            raise RuntimeError("--blocks_to_swap in training needs activation checkpointing of the blocks "
                               "(model.enable_gradient_checkpointing(); the trainer turns it on).")
        if index >= self.first:
            self.misses += index not in self.slot_block
            self.fetch(index, keep=None)
            if self.on_cuda:
                torch.cuda.current_stream(self.device).wait_event(self.ready[self.slot_block.index(index)])
        ahead = index - 1 if backward else index + 1
        if ahead == self.num_blocks and not torch.is_grad_enabled():
            ahead = self.first  # sampling: the next step starts over
        if self.first <= ahead < self.num_blocks:
            self.fetch(ahead, keep=index)

    def fetch(self, index: int, keep) -> None:
        """Put block `index` in a slot (if it is not in one), never the slot of block `keep`."""
        if index in self.slot_block:
            return
        free = [s for s, b in enumerate(self.slot_block) if b is None]
        slot = free[0] if free else next(s for s, b in enumerate(self.slot_block) if b != keep)
        evicted = self.slot_block[slot]
        if evicted is not None:
            for p in self.params[evicted]:
                p.data = self._placeholder(p.dtype)
        if self.on_cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))  # reads of the evicted block first
            with torch.cuda.stream(self.copy_stream):
                for buffer, host in zip(self.slots[slot], self.host[index]):
                    buffer.copy_(host, non_blocking=True)
            self.ready[slot].record(self.copy_stream)
        else:
            for buffer, host in zip(self.slots[slot], self.host[index]):
                buffer.copy_(host)
        for p, buffer in zip(self.params[index], self.slots[slot]):
            p.data = buffer
        self.slot_block[slot] = index


def checkpoint_swapped_blocks(model, swap: BlockSwap) -> None:
    """Activation checkpointing for the swapped blocks only (diffusers' loop calls this function for every block when
    checkpointing is on): the resident blocks keep their activations and run at full speed, so --blocks_to_swap N
    is one dial for memory against time."""
    from torch.utils.checkpoint import checkpoint

    swapped = {id(model.transformer_blocks[i]) for i in swap.params}

    def run_block(block, *args):
        if id(block) in swapped:
            return checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    model.enable_gradient_checkpointing(run_block)


def swap_blocks(model, count, device, prepare_block=None) -> BlockSwap | None:
    """BlockSwap for --blocks_to_swap (N or `all`), or None for 0; the swap is kept on the model as `block_swap`."""
    count = blocks_to_swap(count, len(model.transformer_blocks))
    if not count:
        return None
    swap = BlockSwap(model, count, device, prepare_block)
    model.__dict__["block_swap"] = swap  # not a submodule: its tensors are no part of the model's state
    return swap
