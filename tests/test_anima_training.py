"""Anima training: the objective against the model author's, written independently in float64; full fine-tune and
LoRA through train_text2image.py on the tiny Anima bundle, with its text adapter frozen (the default) or trained at
its own learning rate; exact resume; the files a run writes load back as Anima."""

import shutil

import pytest
import torch

from conftest import anima_args, losses_of, run_script
from cosmos_t2i import anima, anima_text
from cosmos_t2i import checkpoint as ckpt
from cosmos_t2i.families import ANIMA
from cosmos_t2i.flow import draw_training_randomness, flow_loss


def output_losses(result) -> dict[int, float]:
    return losses_of(result.stdout + result.stderr)


def model_file(out, iteration):
    return ckpt.model_file(ckpt.checkpoint_dir(out, "posttraining", "text2image", "a"), iteration)


def dataset_text(bundle, n=3):
    """The first n samples' stored text as a batch of the family's fields."""
    files = sorted((bundle / "dataset" / anima_text.FOLDER).glob("*" + anima_text.SUFFIX))[:n]
    fields = [anima_text.sample_fields(anima_text.read_text(f)) for f in files]
    return {k: torch.stack([f[k] for f in fields]) for k in fields[0]}


def authors_loss(net, x0, batch, z, eps, keep, shift=1.0):
    """diffusion-pipe's Anima objective written out in float64: t = sigmoid(z), z ~ N(0,1) (logit-normal, no shift);
    x_t = (1 - t) x0 + t eps; the DiT, given t, predicts eps - x0; plain mean squared error. A dropped caption is
    the empty prompt as diffusers' Anima pipeline encodes it: one masked Qwen token, the T5 ids of "" ([</s>])."""
    total = 0.0
    for i in range(x0.shape[0]):
        t = torch.sigmoid(z[i:i + 1])
        t = shift * t / (1 + (shift - 1) * t)  # the optional SD3-style shift (none by default)
        if keep[i]:
            n_qwen, n_t5 = int(batch["qwen_mask"][i].sum()), int(batch["t5_mask"][i].sum())
            qwen, ids = batch["qwen_states"][i:i + 1, :n_qwen], batch["t5_ids"][i:i + 1, :n_t5]
            qwen_mask, t5_mask = torch.ones(1, n_qwen), torch.ones(1, n_t5)
        else:
            qwen, qwen_mask = torch.zeros(1, 1, batch["qwen_states"].shape[-1]), torch.zeros(1, 1)
            ids, t5_mask = torch.tensor([[anima_text.T5_EOS]]), torch.ones(1, 1)
        context = net.text_conditioner(qwen.double(), ids, t5_mask, qwen_mask)
        x_t = (1 - t) * x0[i:i + 1] + t * eps[i:i + 1]
        v = net(hidden_states=x_t, timestep=t, encoder_hidden_states=context, padding_mask=torch.zeros(1, 1, 64, 64),
                return_dict=False)[0]
        total += ((v - (eps[i:i + 1] - x0[i:i + 1])) ** 2).mean()
    return total / x0.shape[0]


def test_anima_objective_matches_the_authors_in_float64(anima_bundle):
    net = anima.load_anima(anima_bundle / "models", dtype=torch.float64)
    for p in net.parameters():  # diffusers zero-initialises the output layers: make every path count
        p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    batch = dataset_text(anima_bundle)
    torch.manual_seed(0)
    x0 = torch.randn(3, 16, 1, 8, 8).double()
    sigma, eps, _ = draw_training_randomness(0, 5, range(3), x0.shape[1:], 0.0)
    keep = torch.tensor([1.0, 0.0, 1.0])
    ours = flow_loss(net, x0, anima_text.model_inputs(batch, lambda x: x), sigma.double(), eps.double(), keep.double(),
                     torch.zeros(3, 1, 64, 64).double(), ANIMA.loss_scale, anima_text.drop_captions)
    reference = authors_loss(net, x0, batch, sigma.double().log(), eps.double(), keep)
    assert ANIMA.loss_scale == 1.0
    torch.testing.assert_close(ours.double(), reference, rtol=1e-6, atol=1e-9)
    shifted = flow_loss(net, x0, anima_text.model_inputs(batch, lambda x: x), sigma.double(), eps.double(),
                        keep.double(), torch.zeros(3, 1, 64, 64).double(), ANIMA.loss_scale, anima_text.drop_captions,
                        shift=3.0)
    torch.testing.assert_close(shifted.double(), authors_loss(net, x0, batch, sigma.double().log(), eps.double(), keep,
                                                              shift=3.0), rtol=1e-6, atol=1e-9)
    assert not torch.allclose(shifted, ours)
    # and the draw: t = sigma / (1 + sigma) with log sigma ~ N(0, 1) is the author's t = sigmoid(N(0, 1))
    sig, _, _ = draw_training_randomness(0, 1, range(4000), (1,), 0.0)
    torch.testing.assert_close(sig / (1 + sig), torch.sigmoid(sig.log()), rtol=1e-6, atol=1e-7)
    assert abs(sig.log().mean()) < 0.06 and abs(sig.log().std() - 1) < 0.05


def test_full_fine_tune_trains_the_dit_keeps_the_frozen_adapter_and_writes_an_anima_file(anima_bundle, tmp_path):
    out = tmp_path / "out"
    result = run_script(*anima_args(anima_bundle, out, "--max_iter", 4, "--save_iter", 4, "--cache_latents",
                                    "--latent_cache_dir", tmp_path / "cache", "--validation_prompts", "a red circle",
                                    "--validation_iter", 4, "--validation_steps", 2, "--text_encoder",
                                    anima_bundle / "models"))
    losses = output_losses(result)
    assert sorted(losses) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert (out / "posttraining" / "text2image" / "a" / "validation" / "iter_000000004_0.jpg").is_file()
    base = anima.load_anima(anima_bundle / "models", dtype=torch.float32)
    trained = anima.load_anima(model_file(out, 4), dtype=torch.float32)  # the original single-file layout
    ema = anima.load_anima_model(model_file(out, 4), load_ema=True, dtype=torch.float32)
    for name, value in base.text_conditioner.state_dict().items():  # frozen: the file holds it (bf16, as net.*)
        assert torch.equal(trained.text_conditioner.state_dict()[name], value.bfloat16().float()), name
        assert torch.equal(ema.text_conditioner.state_dict()[name], value.bfloat16().float()), name
    block = "transformer_blocks.0.attn1.to_q.weight"
    assert not torch.allclose(trained.state_dict()[block], base.state_dict()[block].bfloat16().float())
    assert not torch.equal(ema.state_dict()[block], trained.state_dict()[block])
    # exported as a diffusers pipeline's transformer/ + text_conditioner/: the same model
    run_script("-m", "cosmos_t2i.export", "diffusers", "--family", "anima", "--dit_path", model_file(out, 4),
               "--output", tmp_path / "folder")
    folder = anima.load_anima(tmp_path / "folder", dtype=torch.float32).state_dict()
    assert folder.keys() == trained.state_dict().keys()
    assert all(torch.equal(folder[k], v) for k, v in trained.state_dict().items())
    card = (tmp_path / "folder" / "README.md").read_text()
    assert "AnimaTextConditioner.from_pretrained" in card and "--family anima" in card


def test_adapter_lr_trains_the_adapter_and_the_run_resumes_exactly(anima_bundle, tmp_path):
    flags = ["--adapter_lr", "1e-2", "--max_iter", 6, "--save_iter", 3]
    straight = output_losses(run_script(*anima_args(anima_bundle, tmp_path / "straight", *flags)))
    run_script(*anima_args(anima_bundle, tmp_path / "split", *flags[:-4], "--max_iter", 3, "--save_iter", 3))
    resumed = output_losses(run_script(*anima_args(anima_bundle, tmp_path / "split", *flags)))
    assert sorted(resumed) == [4, 5, 6]
    for i in (4, 5, 6):
        assert resumed[i] == straight[i], (i, resumed[i], straight[i])
    base = anima.load_anima(anima_bundle / "models", dtype=torch.float32).text_conditioner.state_dict()
    trained = anima.load_anima(model_file(tmp_path / "straight", 6), dtype=torch.float32).text_conditioner
    changed = [n for n, v in trained.state_dict().items() if not torch.allclose(v, base[n].bfloat16().float())]
    assert "blocks.0.cross_attn.q_proj.weight" in changed and "out_proj.weight" in changed


def test_lora_run_writes_a_lora_file_that_loads_with_its_base_and_trained_adapter(anima_bundle, tmp_path):
    from cosmos_t2i.models import load_dit
    from cosmos_t2i.weight_files import read_weights

    out = tmp_path / "out"
    run_script(*anima_args(anima_bundle, out, "--train_architecture", "lora", "--lora_rank", 4, "--adapter_lr", "1e-2",
                           "--max_iter", 3, "--save_iter", 3, "--no-ema"))
    state = read_weights(model_file(out, 3))
    assert state["lora_metadata"]["family"] == "anima"
    adapter_keys = [k for k in state if k.startswith("net.llm_adapter.")]
    assert adapter_keys and any(".lora_A." in k for k in state)
    merged = load_dit(str(model_file(out, 3)), dtype=torch.float32, family=ANIMA)
    base = anima.load_anima(anima_bundle / "models", dtype=torch.float32)
    for key in adapter_keys:  # the trained adapter replaced the base's
        name = key.removeprefix("net.llm_adapter.")
        assert torch.equal(merged.text_conditioner.state_dict()[name], state[key].float()), name
    block = "transformer_blocks.1.ff.net.2.weight"
    assert not torch.allclose(merged.state_dict()[block], base.state_dict()[block])  # the LoRA was merged
    # a frozen adapter (the default) is not in the file: the base's is used
    run_script(*anima_args(anima_bundle, tmp_path / "frozen", "--train_architecture", "lora", "--lora_rank", 4,
                           "--max_iter", 1, "--save_iter", 1, "--no-ema", "--name", "a"))
    frozen = read_weights(model_file(tmp_path / "frozen", 1))
    assert not any(k.startswith("net.llm_adapter.") for k in frozen)


def test_a_predict2_dataset_or_flag_mismatch_is_named(anima_bundle, tiny_bundle, tmp_path):
    data = shutil.copytree(anima_bundle / "dataset", tmp_path / "dataset")
    shutil.rmtree(data / anima_text.FOLDER)
    result = run_script(*anima_args(anima_bundle, tmp_path / "out", "--dataset_dir", data, "--max_iter", 1),
                        check=False)
    assert result.returncode != 0 and "precompute_t5.py --dataset_path" in result.stderr
    assert "--family anima" in result.stderr
    result = run_script(*anima_args(anima_bundle, tmp_path / "out2", "--family", "predict2", "--adapter_lr", "1e-3"),
                        check=False)
    assert result.returncode != 0 and "--adapter_lr" in result.stderr and "anima" in result.stderr


def test_fsdp_anima_with_a_training_adapter_equals_one_process(anima_bundle, tmp_path):
    """Two gloo processes under FSDP2 (the adapter is gathered with the DiT's root before the DiT's forward runs it)
    give the losses and the model file of one process."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, free_port

    flags = ["--adapter_lr", "1e-2", "--max_iter", 3, "--save_iter", 3, "--lr", "1e-4"]
    one = output_losses(run_script(*anima_args(anima_bundle, tmp_path / "one", *flags)))

    def two_processes(out, *extra):
        args = anima_args(anima_bundle, out, *flags, "--batch_size", 2, *extra)
        args[0] = "tests/run_patched.py"
        env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", COSMOS_TEST_FSDP="1")
        result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                                 "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                 "--main_process_port", str(free_port()), *map(str, args)], cwd=ROOT,
                                capture_output=True, text=True, env=env, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        assert "sharded across 2 processes (FSDP2)" in result.stderr
        return losses_of(result.stderr)

    two = two_processes(tmp_path / "two")
    # bf16 weights (the 24 GB recipe): the adapter trains in the model's dtype, one dtype per FSDP group
    assert sorted(two_processes(tmp_path / "bf16", "--weight_dtype", "bf16", "--max_iter", 2)) == [1, 2]
    assert one.keys() == two.keys() == {1, 2, 3} and all(abs(one[i] - two[i]) < 1e-5 * abs(one[i]) for i in one)
    a = anima.load_anima(model_file(tmp_path / "one", 3), dtype=torch.float32).state_dict()
    b = anima.load_anima(model_file(tmp_path / "two", 3), dtype=torch.float32).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-2, atol=1e-3, msg=k)  # bf16 net.* weights


def test_an_anima_file_given_to_predict2_names_the_family(anima_bundle, tmp_path):
    from cosmos_t2i.models import load_dit

    base = anima.load_anima(anima_bundle / "models", dtype=torch.float32)
    anima.save_single_file(base, tmp_path / "anima.safetensors")
    with pytest.raises(ValueError, match="load it with --family anima"):
        load_dit(str(tmp_path / "anima.safetensors"), "tiny")
    assert load_dit(str(tmp_path / "anima.safetensors"), family=ANIMA).text_conditioner is not None
    # ComfyUI's prefix, read as FSDP's sharded loading reads it (every weight, key-checked against the family's model)
    from cosmos_t2i.models import transformer_weights
    from cosmos_t2i.weight_files import read_weights
    comfy = {"model.diffusion_model." + k.removeprefix("net."): v
             for k, v in read_weights(tmp_path / "anima.safetensors").items()}
    torch.save(comfy, tmp_path / "comfy.pt")
    size, weights = transformer_weights(tmp_path / "comfy.pt", family=ANIMA)
    assert size == "tiny" and torch.equal(weights["text_conditioner.embed.weight"], base.text_conditioner.embed.weight)


def test_switching_the_adapter_on_or_off_at_resume_is_refused(anima_bundle, tmp_path):
    """Whether the adapter trains decides what a checkpoint holds: a resume may change --adapter_lr's value, not
    turn it on or off (the trained adapter would be silently dropped)."""
    out = tmp_path / "out"
    run_script(*anima_args(anima_bundle, out, "--train_architecture", "lora", "--lora_rank", 2, "--adapter_lr", "1e-3",
                           "--max_iter", 1, "--save_iter", 1, "--no-ema"))
    again = run_script(*anima_args(anima_bundle, out, "--train_architecture", "lora", "--lora_rank", 2, "--max_iter",
                                   2, "--save_iter", 1, "--no-ema"), check=False)
    assert again.returncode != 0 and "text_adapter_trains: True -> False" in again.stderr
    changed = run_script(*anima_args(anima_bundle, out, "--train_architecture", "lora", "--lora_rank", 2,
                                     "--adapter_lr", "2e-3", "--max_iter", 2, "--save_iter", 1, "--no-ema"))
    assert "adapter_lr: 0.001 -> 0.002" in changed.stderr
    # --lora_path applies the adapter the file carries, as --dit_path does
    from cosmos_t2i.models import load_dit
    lora = model_file(out, 2)
    as_dit = load_dit(str(lora), dtype=torch.float32, family=ANIMA)
    on_base = load_dit(str(anima_bundle / "models"), lora_path=str(lora), dtype=torch.float32, family=ANIMA)
    for k, v in as_dit.state_dict().items():
        assert torch.equal(v, on_base.state_dict()[k]), k
    run_script("-m", "cosmos_t2i.export", "merged", "--family", "anima", "--lora_path", lora, "--dtype", "fp32",
               "--output", tmp_path / "merged.pt")  # the original single-file layout, the LoRA and adapter merged
    merged = anima.load_anima(tmp_path / "merged.pt", dtype=torch.float32).state_dict()
    assert all(torch.equal(merged[k], v) for k, v in as_dit.state_dict().items())
    run_script("-m", "cosmos_t2i.export", "lora-comfyui", "--lora_path", lora, "--output", tmp_path / "c.safetensors")
    comfy = load_dit(str(anima_bundle / "models"), lora_path=str(tmp_path / "c.safetensors"), dtype=torch.float32,
                     family=ANIMA)  # the trained adapter rides as .set_weight entries (tests/test_anima_lora_formats.py)
    for k, v in as_dit.state_dict().items():
        torch.testing.assert_close(comfy.state_dict()[k], v, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="--family anima"):  # an Anima LoRA or folder is never taken for Predict2
        load_dit(str(lora), dtype=torch.float32)
    with pytest.raises(ValueError, match="--family anima"):
        load_dit(str(anima_bundle / "models"), dtype=torch.float32)


def test_a_training_adapter_attends_without_cudnn(monkeypatch):
    """torch's cuDNN attention backward gives NaN query gradients with a mask at key lengths of 64 mod 128
    (pytorch#196678); the adapter passes masks, and a dropped caption masks every key. When the adapter trains, its
    attention runs on the other backends, in the forward and in --gradient_checkpointing's recompute alike (a
    different backend there would fail the checkpoint's check); the DiT's blocks, a frozen adapter and sampling keep
    torch's choice."""
    import copy

    from cosmos_t2i.training import prepare_for_training
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):  # the adapter's queries are its 64 T5 positions, the DiT's its 16 patches
        calls.append(("adapter" if query.shape[-2] == 64 else "dit", torch.backends.cuda.cudnn_sdp_enabled()))
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    g = torch.Generator().manual_seed(0)
    net = anima.new_anima("tiny")
    text = anima.text_inputs(torch.randn(2, 192, 64, generator=g), torch.tensor([[1] * 100 + [0] * 92, [0] * 192]),
                             torch.randint(0, 64, (2, 64), generator=g), torch.ones(2, 64, dtype=torch.long))
    x, t = torch.randn(2, 16, 1, 8, 8, generator=g), torch.tensor([0.3, 0.7])

    def step(model, backward=True):
        calls.clear()
        out = model(hidden_states=x, timestep=t, encoder_hidden_states=text, padding_mask=torch.zeros(1, 1, 64, 64),
                    return_dict=False)[0]
        forward = list(calls)
        if backward:
            out.square().mean().backward()
        return out.detach(), forward, calls[len(forward):]

    frozen_out, frozen, _ = step(prepare_for_training(copy.deepcopy(net), gradient_checkpointing=True))
    trained = prepare_for_training(net, gradient_checkpointing=True, train_text_adapter=True)
    out, forward, recomputed = step(trained)
    assert frozen and all(cudnn for _, cudnn in frozen)
    assert ("adapter", False) in forward and all(cudnn == (kind == "dit") for kind, cudnn in forward)
    assert ("adapter", False) in recomputed and all(cudnn == (kind == "dit") for kind, cudnn in recomputed)
    assert torch.equal(out, frozen_out)
    assert all(torch.isfinite(p.grad).all() for p in trained.text_conditioner.parameters())
    with torch.no_grad():
        assert all(cudnn for _, cudnn in step(trained, backward=False)[1])  # sampling: as diffusers' pipeline
