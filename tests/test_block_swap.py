"""Block swap (--blocks_to_swap): the same losses, gradients and images as the model kept whole, with at most two
swapped blocks' weights present at any time."""

import copy

import pytest
import torch

from conftest import anima_args, losses_of, run_script
from cosmos_t2i.block_swap import BlockSwap, blocks_to_swap, checkpoint_swapped_blocks, swap_blocks
from cosmos_t2i.lora import add_lora
from cosmos_t2i.models import new_transformer

BLOCKS = 5


def lora_model(checkpointing=True):
    torch.manual_seed(0)
    model = new_transformer("tiny", num_layers=BLOCKS)
    add_lora(model, rank=4, alpha=4, nvidia_targets=["q_proj", "v_proj", "mlp.layer1"], seed=1)
    for name, p in model.named_parameters():  # B starts at zero: make the adapters matter
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 16, 1, 8, 8, generator=g), timestep=torch.rand(2, generator=g),
                encoder_hidden_states=torch.randn(2, 12, 1024, generator=g),
                padding_mask=torch.zeros(1, 1, 64, 64), return_dict=False)


def present(swap: BlockSwap) -> list[int]:
    """Swapped blocks whose weights are in the model now."""
    return [i for i, params in swap.params.items() if all(p.numel() for p in params)]


def step(model, seed):
    out = model(**inputs(seed))[0]
    loss = (out.float() ** 2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("count", [1, 3, "all"])
def test_training_step_is_bit_identical_and_keeps_two_blocks(count):
    reference = lora_model()
    swapped = copy.deepcopy(reference)
    swap = swap_blocks(swapped, count, "cpu")
    assert swap.num_blocks - swap.first == (BLOCKS if count == "all" else count)
    assert present(swap) == []  # nothing is in the model until a block is needed
    for seed in range(3):  # forward, recompute downwards, then the next step's forward again
        loss, grads = step(reference, seed)
        loss_swapped, grads_swapped = step(swapped, seed)
        assert torch.equal(loss, loss_swapped)
        assert grads.keys() == grads_swapped.keys() and len(grads) > 0
        for name in grads:
            assert torch.equal(grads[name], grads_swapped[name]), name
        assert len(present(swap)) <= 2
    # the frozen weights are unchanged in host memory, trainable ones never left the model
    for index, host in swap.host.items():
        block = dict(reference.transformer_blocks[index].named_parameters())
        names = [n for n, p in reference.transformer_blocks[index].named_parameters() if not p.requires_grad]
        assert all(torch.equal(block[n], h) for n, h in zip(names, host))


def test_checkpointing_only_the_swapped_blocks_is_exact():
    """The trainer's default with --blocks_to_swap N: resident blocks keep their activations, swapped ones are
    recomputed; against a model with no checkpointing at all."""
    reference = lora_model(checkpointing=False)
    swapped = copy.deepcopy(reference)
    swap = swap_blocks(swapped, 2, "cpu")
    checkpoint_swapped_blocks(swapped, swap)
    recomputed = []
    for i, block in enumerate(swapped.transformer_blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: recomputed.append(i) if torch._C._current_graph_task_id()
                                        != -1 else None)
    for seed in range(2):
        loss, grads = step(reference, seed)
        loss_swapped, grads_swapped = step(swapped, seed)
        assert torch.equal(loss, loss_swapped)
        assert all(torch.equal(grads[n], grads_swapped[n]) for n in grads)
    assert recomputed == [4, 3, 4, 3]  # only the swapped blocks ran again in the backward pass


def test_sampling_is_bit_identical_over_steps():
    reference = lora_model().eval()
    swapped = copy.deepcopy(reference)
    swap = swap_blocks(swapped, "all", "cpu")
    with torch.no_grad():
        for seed in range(3):
            assert torch.equal(reference(**inputs(seed))[0], swapped(**inputs(seed))[0])
            assert len(present(swap)) <= 2
    # after the last block, the next step's first block is fetched ahead (the wrap-around)
    assert swap.first in swap.slot_block


def test_training_without_checkpointing_is_refused_and_counts_are_checked():
    model = lora_model()
    model.disable_gradient_checkpointing()
    swap_blocks(model, 2, "cpu")
    with pytest.raises(RuntimeError, match="activation checkpointing"):
        model(**inputs(0))
    assert blocks_to_swap("all", 28) == 28 and blocks_to_swap("0", 28) == 0
    with pytest.raises(ValueError, match="0 to 28"):
        blocks_to_swap(29, 28)


def test_trainer_lora_with_swap_on_two_processes_equals_one_process_checkpointed(tiny_bundle, tmp_path):
    """Predict2 through train_text2image.py: --blocks_to_swap all on 2 data-parallel (DDP, gloo) processes gives the
    losses and LoRA file of one process with --gradient_checkpointing alone (the tiny model has 2 blocks: both
    swapped, both slots in use; DDP leaves the swapped weights out of its start-up broadcast)."""
    from test_multiprocess import assert_close_dicts, run

    lora = ["--max_iter", "3", "--save_iter", "3", "--train_architecture", "lora", "--lr", "1e-2"]
    plain = run(1, tiny_bundle, tmp_path / "plain", *lora, "--gradient_checkpointing")
    swapped = run(2, tiny_bundle, tmp_path / "swap", *lora, "--blocks_to_swap", "all", fsdp=False)
    assert "block swap: the frozen weights of the last 2 of 2 blocks" in (tmp_path / "swap" / "launch.log").read_text()
    assert plain.keys() == swapped.keys() == {1, 2, 3}
    assert all(abs(plain[i] - swapped[i]) < 1e-5 * abs(plain[i]) for i in plain), (plain, swapped)
    files = [torch.load(f, map_location="cpu", weights_only=True)
             for f in (sorted((tmp_path / name).rglob("model/iter_000000003.pt"))[0] for name in ("plain", "swap"))]
    for f in files:
        f.pop("lora_metadata")
    assert_close_dicts(*files, tol=5e-4)  # Adam magnifies the last bits of DDP's reduction order (test_multiprocess)


def test_trainer_anima_lora_and_inference_with_swap(anima_bundle, tmp_path):
    """Anima through the scripts: a LoRA run with one block swapped equals the checkpointed run, and sampling from it
    with --blocks_to_swap all writes the same image as without."""
    runs = {}
    for name, flags in {"plain": ["--gradient_checkpointing"], "swap": ["--blocks_to_swap", "1"]}.items():
        result = run_script(*anima_args(anima_bundle, tmp_path / name, "--train_architecture", "lora", "--max_iter",
                                        "2", "--save_iter", "2", "--lora_rank", "4", "--lora_alpha", "4", *flags))
        runs[name] = losses_of(result.stdout + result.stderr)
        if name == "swap":
            assert "block swap: the frozen weights of the last 1 of" in result.stdout + result.stderr
    assert runs["plain"] == runs["swap"] and len(runs["plain"]) == 2
    lora_file, = (tmp_path / "swap").rglob("model/iter_000000002.pt")
    images = {}
    for name, flags in {"whole": [], "swapped": ["--blocks_to_swap", "all"]}.items():
        out = tmp_path / f"image_{name}.png"
        run_script("infer_text2image.py", "--family", "anima", "--model_size", "tiny", "--dit_path",
                   anima_bundle / "models", "--lora_path", lora_file, "--vae_path",
                   anima_bundle / "models" / "vae", "--text_encoder", anima_bundle / "models", "--prompt", "a red cube",
                   "--height", "64", "--width", "64", "--num_steps", "3", "--dtype", "fp32", "--save_path", out, *flags)
        images[name] = out.read_bytes()
    assert images["whole"] == images["swapped"]


@pytest.mark.parametrize("count, first_misses", [(3, 0), ("all", 1)])
def test_blocks_are_fetched_ahead_through_training_sampling_and_training(count, first_misses):
    """Every swapped block but the run's very first is already in a slot when it is needed: forward upwards, the
    backward pass's recompute downwards, a sampling step wrapping around, and training again."""
    model = lora_model()
    swap = swap_blocks(model, count, "cpu")
    step(model, 0)
    with torch.no_grad():
        model(**inputs(1))
    step(model, 2)
    assert swap.misses == first_misses


def test_fp8_stored_base_swaps_exactly():
    """--lora_base_dtype fp8 with --blocks_to_swap: the swapped blocks are converted one at a time on their way to
    host memory (training.swap_lora_base) and compute as the model converted whole."""
    from cosmos_t2i.lora import store_frozen_linears_in_fp8_
    from cosmos_t2i.training import swap_lora_base

    reference = lora_model()
    swapped = copy.deepcopy(reference)
    store_frozen_linears_in_fp8_(reference.transformer_blocks)
    swap = swap_lora_base(swapped, 3, "cpu", base_fp8=True, checkpoint_all=True)
    assert swap.fp8_params > 0 and all(p.dtype == torch.float8_e5m2 for p in swap.host[4] if p.ndim == 2)
    store_frozen_linears_in_fp8_(swapped.transformer_blocks)  # the resident blocks, as prepare_for_training does next
    for seed in range(2):
        loss, grads = step(reference, seed)
        loss_swapped, grads_swapped = step(swapped, seed)
        assert torch.equal(loss, loss_swapped) and all(torch.equal(grads[n], grads_swapped[n]) for n in grads)
