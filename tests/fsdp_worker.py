"""A few training steps with torch's fully_shard (FSDP2) on CPU/gloo, saving checkpoints as the trainer does.

    python -m torch.distributed.run --nproc_per_node N tests/fsdp_worker.py BUNDLE OUT STEPS [RESUME_FROM]

N=1 runs unsharded; N>1 shards every transformer block and the root. The global batch is 4 samples, split
across processes. Used by tests/test_multiprocess.py.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cosmos_t2i.checkpoint import atomic_save, ema_from_model_file, full_model_state  # noqa: E402
from cosmos_t2i.data import ImageDataset  # noqa: E402
from cosmos_t2i.distributed import (gather_model_state, gather_optimizer_state, load_model_state,  # noqa: E402
                                    load_optimizer_state, nan_to_zero_)
from cosmos_t2i.ema import PowerEMA  # noqa: E402
from cosmos_t2i.flow import draw_training_randomness, flow_loss  # noqa: E402
from cosmos_t2i.models import encode_images, load_vae  # noqa: E402

GLOBAL_BATCH = 4


def main():
    bundle, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    resume = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    from diffusers import CosmosTransformer3DModel
    model = CosmosTransformer3DModel.from_pretrained(bundle / "models" / "transformer").train()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for block in model.transformer_blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.2, foreach=True)
    ema = PowerEMA(list(model.named_parameters()))
    start = 0
    if resume is not None:
        state = torch.load(resume / "optim.pt", weights_only=True)
        load_model_state(model, state["master_weights"])
        load_optimizer_state(model, optimizer, state["optimizer"])
        ema.load_state_dict(ema_from_model_file(torch.load(resume / "model.pt", weights_only=True)))
        start = state["iteration"]
    data = ImageDataset(bundle / "dataset", (64, 64))
    vae = load_vae(str(bundle / "models" / "vae"), torch.bfloat16)
    per_rank = GLOBAL_BATCH // world
    losses = []
    for iteration in range(start + 1, start + steps + 1):
        first = (iteration - 1) * GLOBAL_BATCH % len(data) + rank * per_rank
        ids = list(range(first, first + per_rank))
        batch = [data[i] for i in ids]
        latents = encode_images(vae, torch.stack([b["images"] for b in batch]))
        sigma, noise, keep = draw_training_randomness(0, iteration, [i - first + rank * per_rank for i in ids],
                                                      latents.shape[1:], 0.2)
        loss = flow_loss(model, latents, torch.stack([b["t5_text_embeddings"] for b in batch]), sigma, noise, keep,
                         torch.stack([b["padding_mask"] for b in batch]))
        loss.backward()
        if world > 1 and not hasattr(params[0], "device_mesh"):
            raise RuntimeError("expected sharded parameters")
        nan_to_zero_([p.grad for p in params])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(iteration)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    full = gather_model_state(model)
    ema_state = ema.state_dict()
    optim_state = gather_optimizer_state(model, optimizer)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_save(full_model_state(full, ema_state), out / "model.pt")
        atomic_save({"optimizer": optim_state, "master_weights": full, "iteration": start + steps}, out / "optim.pt")
        (out / "losses.json").write_text(json.dumps(losses))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
