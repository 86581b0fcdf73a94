"""Sampling, checkpoint formats, LoRA, exports and the inference CLI."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image

from cosmos_t2i import checkpoint as ckpt
from cosmos_t2i import flow
from cosmos_t2i.checkpoint import atomic_save
from cosmos_t2i.weight_files import full_model_state
from cosmos_t2i.models import load_dit
from cosmos_t2i.weight_files import diffusers_to_nvidia, diffusers_to_nvidia_key
from cosmos_t2i.pipeline import CosmosText2Image


@pytest.fixture(scope="module")
def base(tiny_bundle):
    from diffusers import CosmosTransformer3DModel
    return CosmosTransformer3DModel.from_pretrained(tiny_bundle / "models" / "transformer").eval()


@pytest.fixture(scope="module")
def probe():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 16, 1, 8, 8, generator=g), torch.tensor([0.3, 0.8]), torch.randn(2, 512, 1024, generator=g)


def outputs(model, probe):
    x, t, ctx = probe
    with torch.no_grad():
        return model(x, t, ctx, padding_mask=torch.zeros(1, 1, 64, 64)).sample


def assert_relative_close(actual, expected, tol=1e-2):
    """‖a − e‖ / ‖e‖ below tol: the right measure for bf16-stored weights."""
    error = ((actual - expected).norm() / expected.norm()).item()
    assert error < tol, error


def perturbed(base, scale=0.05, seed=1):
    """A copy of the base model with every weight moved (stands in for trained weights)."""
    import copy
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


# ---------------------------------------------------------------- key names and checkpoint forms
def test_inverse_key_mapping_agrees_with_diffusers_converter(base):
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers
    ours = base.state_dict()
    nvidia = diffusers_to_nvidia(ours, "net.")
    assert "net.blocks.1.adaln_modulation_cross_attn.2.weight" in nvidia and "net.x_embedder.proj.1.weight" in nvidia
    nvidia["net.pos_embedder.seq"] = torch.arange(4.0)  # non-weight entries NVIDIA files carry
    nvidia["net.accum_iteration"] = torch.tensor(3)
    back = convert_cosmos_transformer_checkpoint_to_diffusers(dict(nvidia))
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    for key in ours:
        assert diffusers_to_nvidia_key(key) in {k[4:] for k in nvidia}


@pytest.mark.parametrize("form", ["net_pt", "bare_pt", "safetensors", "post_training_ema", "nvidia_lora",
                                  "diffusers_folder", "ours_full"])
def test_every_checkpoint_form_loads_and_matches(form, base, probe, tmp_path):
    trained = perturbed(base)
    expected = outputs(trained, probe)
    sd = trained.state_dict()
    load_ema = False
    if form == "net_pt":
        path = tmp_path / "model.pt"
        torch.save({**diffusers_to_nvidia(sd, "net."), "net.pos_embedder.seq": torch.zeros(3),
                    "net.accum_video_sample_counter": torch.tensor(1)}, path)
    elif form == "bare_pt":
        path = tmp_path / "model.pt"
        torch.save(diffusers_to_nvidia(sd), path)
    elif form == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "model.safetensors"
        save_file(diffusers_to_nvidia(sd, "net."), str(path))
    elif form == "post_training_ema":  # NVIDIA post-training: net.* = live weights, net_ema.* = EMA
        path, load_ema = tmp_path / "iter_000001000.pt", True
        torch.save({**diffusers_to_nvidia(base.state_dict(), "net."), **diffusers_to_nvidia(sd, "net_ema.")}, path)
    elif form == "nvidia_lora":  # NVIDIA LoRA post-training: full state dict with PEFT keys
        from peft import LoraConfig
        lora = perturbed(base, seed=3)
        lora.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                                       "ff.net.0.proj", "ff.net.2"]))
        with torch.no_grad():
            for n, p in lora.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        expected = outputs(lora, probe)
        path = tmp_path / "lora_full.pt"
        torch.save(diffusers_to_nvidia(lora.state_dict(), "net."), path)
        assert any(k.endswith("q_proj.base_layer.weight") for k in torch.load(path))
        assert any(k.endswith("q_proj.lora_A.default.weight") for k in torch.load(path))
    elif form == "diffusers_folder":
        path = tmp_path / "transformer"
        trained.save_pretrained(path)
    else:
        path = tmp_path / "iter_000000010.pt"
        atomic_save(full_model_state(base.state_dict(), sd), path)
        load_ema = True
    model = load_dit(str(path), "tiny" if form != "diffusers_folder" else None, load_ema, dtype=torch.float32)
    torch.testing.assert_close(outputs(model, probe), expected, rtol=2e-4, atol=2e-5)


def test_load_errors_are_clear(base, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(diffusers_to_nvidia(base.state_dict(), "net."), path)
    with pytest.raises(ValueError, match="no EMA weights"):
        load_dit(str(path), "tiny", load_ema=True)
    assert load_dit(str(path), None) is not None  # the size is read off the weights' shapes
    with pytest.raises(ValueError, match="missing 520.*wrong shape"):
        load_dit(str(path), "2B")
    sd = diffusers_to_nvidia(base.state_dict(), "net.")
    sd["net.blocks.0.extra.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(ValueError, match="blocks.0.extra.weight"):
        load_dit(str(path), "tiny")
    base.save_pretrained(tmp_path / "folder")
    with pytest.raises(ValueError, match="does not hold a 2B model"):
        load_dit(str(tmp_path / "folder"), "2B")
    # keys are named as the file names them (NVIDIA's, with its prefix), so the list can be searched for
    sd = diffusers_to_nvidia(base.state_dict(), "net.")
    del sd["net.blocks.1.self_attn.q_proj.weight"]
    sd["net.blocks.0.mlp.layer2.weight"] = torch.zeros(3, 3)
    torch.save(sd, path)
    with pytest.raises(ValueError) as error:
        load_dit(str(path), "tiny")
    assert "missing 1: net.blocks.1.self_attn.q_proj.weight" in str(error.value)
    assert "wrong shape 1 (file vs model): net.blocks.0.mlp.layer2.weight (3, 3)" in str(error.value)


# ---------------------------------------------------------------- samplers
def gaussian_problem(mu=0.7, s=0.5):
    """x0 ~ N(mu, s^2): exact EDM denoiser and exact probability-flow ODE solution."""
    def denoise(x, sigma):
        return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)

    def exact(x_start, sigma_start, sigma_end):
        return mu + math.sqrt(s ** 2 + sigma_end ** 2) / math.sqrt(s ** 2 + sigma_start ** 2) * (x_start - mu)
    return denoise, exact


def test_ab2_sampler_on_gaussian_data():
    mu, s = 0.7, 0.5
    denoise, exact = gaussian_problem(mu, s)
    x = flow.initial_noise(0, (20000,)).double() * flow.SIGMA_MAX
    samples = flow.sample_ab2(denoise, x.float(), flow.karras_sigmas(35))
    assert abs(samples.mean() - mu) < 0.01 and abs(samples.std() - s) < 0.01
    errors = []
    for steps in (16, 32, 64):
        sigmas = flow.karras_sigmas(steps)
        target = denoise(exact(x, sigmas[0], sigmas[-1]), sigmas[-1])
        got = flow.sample_ab2(lambda z, sig: denoise(z.double(), sig), x.float(), sigmas)
        errors.append((got.double() - target).abs().max().item())
    assert errors[0] / errors[1] >= 2 and errors[1] / errors[2] >= 2, errors


def test_initial_noise_is_numpy_random_state():
    expected = np.random.RandomState(42).standard_normal((1, 16, 1, 4, 6)).astype(np.float32)
    np.testing.assert_array_equal(flow.initial_noise(42, (1, 16, 1, 4, 6)).numpy(), expected)
    sig = flow.karras_sigmas(35)
    assert len(sig) == 36 and sig[0] == pytest.approx(80) and sig[-1] == pytest.approx(0.002)
    assert sig[1] == pytest.approx(68.33, abs=0.01)


def test_batched_guidance_equals_two_forwards(base):
    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(2, 512, 1024, generator=g), torch.randn(2, 512, 1024, generator=g)
    x = torch.randn(2, 16, 1, 8, 8, generator=g) * 3
    pm = torch.zeros(1, 1, 64, 64)
    batched = flow.make_denoiser(base, cond, uncond, 4.0, pm)(x, 2.5)
    c = flow.make_denoiser(base, cond, None, 0.0, pm)(x, 2.5)
    u = flow.make_denoiser(base, uncond, None, 0.0, pm)(x, 2.5)
    torch.testing.assert_close(batched, c + 4.0 * (c - u), rtol=1e-5, atol=1e-5)


def test_lean_attention_computes_what_diffusers_does(tiny_bundle, base, probe):
    """The inference pipeline's attention processor: diffusers' arithmetic (fp32 equal; bf16 as close to the fp32
    result as diffusers' own bf16), with fewer memory passes."""
    import copy

    from diffusers.models.embeddings import apply_rotary_emb

    from cosmos_t2i.attention import LeanCosmosAttnProcessor, rope_half_split, use_lean_attention
    g = torch.Generator().manual_seed(4)
    x, freqs = torch.randn(2, 6, 3, 16, generator=g), torch.randn(6, 8, generator=g)
    cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)  # equal halves, as Cosmos's
    expected = apply_rotary_emb(x.transpose(1, 2), (cos, sin), use_real=True, use_real_unbind_dim=-2).transpose(1, 2)
    torch.testing.assert_close(rope_half_split(x, cos, sin), expected, rtol=1e-6, atol=1e-6)

    reference = perturbed(base)  # norms and projections away from their initial values
    lean = copy.deepcopy(reference)
    assert use_lean_attention(lean) == 2 * len(lean.transformer_blocks)
    torch.testing.assert_close(outputs(lean, probe), outputs(reference, probe), rtol=1e-5, atol=1e-5)
    exact = outputs(reference, probe)
    bf16_probe = tuple(t.bfloat16() for t in probe)

    def bf16_error(model):
        with torch.no_grad():
            out = model.bfloat16()(*bf16_probe, padding_mask=torch.zeros(1, 1, 64, 64).bfloat16()).sample.float()
        return ((out - exact).norm() / exact.norm()).item()
    assert bf16_error(lean) <= 1.05 * bf16_error(reference)

    pipe = CosmosText2Image.from_pretrained(dit_path=str(tiny_bundle / "models" / "transformer"),
                                            vae_path=str(tiny_bundle / "models" / "vae"), device="cpu",
                                            dtype=torch.float32)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn2.processor, LeanCosmosAttnProcessor)


def test_zero_negative_skips_its_cross_attention_exactly(base, monkeypatch):
    """With NVIDIA's default zero negative embedding the guided step computes cross-attention for the conditional
    rows only (the unconditional rows' output is zero); x0 equals diffusers' processors computing every row."""
    import copy

    from cosmos_t2i.attention import LeanCosmosAttnProcessor, use_lean_attention
    reference = perturbed(base, seed=3)
    lean = copy.deepcopy(reference)
    use_lean_attention(lean)
    rows = []
    attend = LeanCosmosAttnProcessor.attend

    def counting(attn, hidden_states, encoder_hidden_states=None, *rest):
        if encoder_hidden_states is not None:
            rows.append(hidden_states.shape[0])
        return attend(attn, hidden_states, encoder_hidden_states, *rest)
    monkeypatch.setattr(LeanCosmosAttnProcessor, "attend", staticmethod(counting))
    g = torch.Generator().manual_seed(6)
    cond, x = torch.randn(2, 512, 1024, generator=g), torch.randn(2, 16, 1, 8, 8, generator=g) * 3
    pm = torch.zeros(1, 1, 64, 64)
    for uncond, computed in ((torch.zeros_like(cond), 2), (torch.randn(2, 512, 1024, generator=g), 4)):
        rows.clear()
        ours = flow.make_denoiser(lean, cond, uncond, 4.0, pm)(x, 2.5)
        assert rows == [computed] * len(lean.transformer_blocks)  # 2 conditional rows of 4, or all 4
        torch.testing.assert_close(ours, flow.make_denoiser(reference, cond, uncond, 4.0, pm)(x, 2.5),
                                   rtol=1e-5, atol=1e-5)
    assert all(p.context_rows is None for p in (b.attn2.processor for b in lean.transformer_blocks))


def test_euler_sampler_reproduces_diffusers_pipeline(tiny_bundle, base):
    from diffusers import AutoencoderKLWan, Cosmos2TextToImagePipeline, FlowMatchEulerDiscreteScheduler

    class StandInSafetyChecker(torch.nn.Module):  # the pipeline refuses to run without one
        device = torch.device("cpu")

        def check_text_safety(self, prompt):
            return True

        def check_video_safety(self, video):
            return video

    vae = AutoencoderKLWan.from_pretrained(tiny_bundle / "models" / "vae")
    scheduler = FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True, shift=1.0)
    reference = Cosmos2TextToImagePipeline(text_encoder=None, tokenizer=None, transformer=base, vae=vae,
                                           scheduler=scheduler, safety_checker=StandInSafetyChecker())
    g = torch.Generator().manual_seed(2)
    cond, neg = torch.randn(1, 512, 1024, generator=g), torch.randn(1, 512, 1024, generator=g)
    noise = flow.initial_noise(3, (1, 16, 1, 8, 8))
    call = dict(prompt_embeds=cond, negative_prompt_embeds=neg, height=64, width=64, num_inference_steps=12,
                guidance_scale=3.0)
    expected_latents = reference(latents=noise.clone(), output_type="latent", **call).images
    expected_image = reference(latents=noise.clone(), output_type="np", **call).images[0]
    ours = CosmosText2Image(base, vae)
    latents = ours.sample_latents(cond, neg, seeds=[3], height=64, width=64, guidance=3.0, num_steps=12,
                                  sampler="euler")
    torch.testing.assert_close(latents[:, :, 0], expected_latents, rtol=1e-5, atol=1e-5)
    # the pipeline's stand-in safety pass round-trips pixels through uint8, so compare 8-bit levels
    from cosmos_t2i.models import decode_latents
    image = ((decode_latents(vae, latents)[0] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
    levels, expected_levels = np.floor(image * 255), np.round(expected_image * 255)
    assert np.abs(levels - expected_levels).max() <= 1 and (levels == expected_levels).mean() > 0.99


# ---------------------------------------------------------------- LoRA formats and exports
@pytest.fixture(scope="module")
def lora_run(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    run_script("train_text2image.py", "--model_size", "tiny", "--dit_path", tiny_bundle / "models/transformer",
               "--vae_path", tiny_bundle / "models/vae", "--dataset_dir", tiny_bundle / "dataset",
               "--image_size", "64", "64", "--batch_size", "2", "--num_workers", "0", "--mixed_precision", "no",
               "--lr", "2e-2", "--scheduler", "constant", "--report_to", "none", "--output_root", out,
               "--train_architecture", "lora", "--lora_rank", "4", "--lora_alpha", "8", "--max_iter", "4",
               "--save_iter", "4", "--name", "lora")
    return out / "posttraining/text2image/lora"


def test_lora_on_a_different_base_warns(lora_run, tmp_path, caplog):
    import logging
    import shutil

    other = tmp_path / "other_base"
    shutil.copytree(ckpt.load_part(lora_run / "checkpoints", "model", 4)["lora_metadata"]["base_path"], other)
    weights = next(other.glob("*.safetensors"))
    from safetensors.torch import load_file, save_file
    state = load_file(weights)
    key = sorted(state)[0]
    state[key] = state[key] + 1  # the same shapes, other content
    save_file(state, weights)
    with caplog.at_level(logging.WARNING):
        load_dit(str(lora_run), base_dit_path=str(other), dtype=torch.float32)
    assert "fingerprint mismatch" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_dit(str(lora_run), dtype=torch.float32)  # the recorded base itself
    assert "fingerprint mismatch" not in caplog.text


def test_prompts_beyond_512_tokens_warn(tiny_bundle, caplog):
    import logging
    from cosmos_t2i.t5 import encode_prompts, load_text_encoder
    tokenizer, encoder = load_text_encoder(str(tiny_bundle / "models" / "text_encoder"), "cpu", torch.float32)
    with caplog.at_level(logging.WARNING):
        short, long = encode_prompts(tokenizer, encoder, ["a red circle", "red circle " * 400])
    assert "the T5 encoder reads the first 512" in caplog.text and "a red circle" not in caplog.text
    assert long.shape[0] == 512 and short.shape[0] < 10


def test_lora_exports_load_back_and_in_diffusers(lora_run, base, probe, tmp_path):
    import copy
    from safetensors.torch import load_file
    ours = load_dit(str(lora_run), dtype=torch.float32)
    expected = outputs(ours, probe)
    assert (expected - outputs(base, probe)).abs().max() > 1e-3
    model_file = lora_run / "checkpoints/model/iter_000000004.pt"

    sample = tmp_path / "sample.jpg"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(sample)
    run_script("-m", "cosmos_t2i.export", "lora-diffusers", "--lora_path", lora_run, "--output", tmp_path / "dif",
               "--sample_image", sample)
    card = (tmp_path / "dif" / "README.md").read_text()  # the model card: base, run settings, rank/alpha, iteration
    base_path = ckpt.load_part(lora_run / "checkpoints", "model", 4)["lora_metadata"]["base_path"]
    assert f"base_model: {base_path}" in card and "(iteration 4)" in card and "LoRA rank 4, alpha 8.0" in card
    assert "| lr | 0.02 |" in card and "| max_iter | 4 |" in card and "![sample](sample.jpg)" in card
    assert (tmp_path / "dif" / "sample.jpg").exists()
    peft_model = copy.deepcopy(base)
    peft_model.load_lora_adapter(str(tmp_path / "dif"), weight_name="pytorch_lora_weights.safetensors")
    torch.testing.assert_close(outputs(peft_model, probe), expected, rtol=1e-4, atol=1e-5)

    run_script("-m", "cosmos_t2i.export", "lora-comfyui", "--lora_path", model_file, "--output", tmp_path / "c.safetensors")
    comfy = load_file(str(tmp_path / "c.safetensors"))
    assert "diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight" in comfy
    assert float(comfy["diffusion_model.blocks.0.mlp.layer1.alpha"]) == 8.0

    run_script("-m", "cosmos_t2i.export", "merged", "--lora_path", lora_run, "--output", tmp_path / "merged.pt")
    merged = torch.load(tmp_path / "merged.pt", weights_only=True)
    assert all(k.startswith("net.") for k in merged) and "net.blocks.0.self_attn.q_proj.weight" in merged

    base_file = tmp_path / "base.pt"
    torch.save(diffusers_to_nvidia(base.state_dict(), "net."), base_file)
    for lora in (tmp_path / "dif", tmp_path / "c.safetensors", model_file):  # every form back through --lora_path
        again = load_dit(str(base_file), "tiny", lora_path=str(lora), dtype=torch.float32)
        torch.testing.assert_close(outputs(again, probe), expected, rtol=1e-4, atol=1e-5)
    back = load_dit(str(tmp_path / "merged.pt"), "tiny", dtype=torch.float32)
    assert_relative_close(outputs(back, probe), expected)  # the merged file is bf16
    run_script("-m", "cosmos_t2i.export", "merged", "--lora_path", lora_run, "--dtype", "fp32", "--output",
               tmp_path / "merged32.pt")
    exact = load_dit(str(tmp_path / "merged32.pt"), "tiny", dtype=torch.float32)
    torch.testing.assert_close(outputs(exact, probe), expected, rtol=1e-4, atol=1e-5)  # fp32: the merge is exact


def test_export_diffusers_folder(tiny_bundle, tmp_path, base, probe):
    from diffusers import CosmosTransformer3DModel
    trained = perturbed(base)
    path = tmp_path / "iter_000000010.pt"
    atomic_save(full_model_state(base.state_dict(), trained.state_dict()), path)
    run_script("-m", "cosmos_t2i.export", "diffusers", "--dit_path", path, "--model_size", "tiny", "--load_ema",
               "--output", tmp_path / "exported")
    loaded = CosmosTransformer3DModel.from_pretrained(tmp_path / "exported").float()
    assert "EMA" in (tmp_path / "exported" / "README.md").read_text()
    assert_relative_close(outputs(loaded, probe), outputs(trained, probe))  # exported in bf16


# ---------------------------------------------------------------- CLI
def test_cli_writes_image_and_settings(tiny_bundle, lora_run, tmp_path):
    models = tiny_bundle / "models"
    common = ["infer_text2image.py", "--vae_path", models / "vae", "--text_encoder", models / "text_encoder",
              "--dtype", "fp32", "--num_steps", "4"]
    run_script(*common, "--dit_path", lora_run, "--load_ema", "--prompt", "a red circle", "--height", "48",
               "--width", "80", "--save_path", tmp_path / "out" / "img.mp4", "--negative_prompt", "blurry",
               "--text_encoder_8bit",
               "--disable_guardrail")
    image = Image.open(tmp_path / "out" / "img.jpg")
    assert image.format == "JPEG" and image.size == (80, 48)
    text = (tmp_path / "out" / "img.txt").read_text()
    assert "prompt: a red circle" in text and "negative_prompt: blurry" in text and "seed: 0" in text
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"prompt": "a yellow square", "output_image": str(tmp_path / "b" / "1.png")},
                                {"prompt": "a red circle", "output_image": str(tmp_path / "b" / "2.png")}]))
    run_script(*common, "--dit_path", models / "transformer", "--batch_input_json", jobs, "--resolution", "480",
               "--aspect_ratio", "1:1", "--sampler", "euler")
    assert Image.open(tmp_path / "b" / "2.png").size == (480, 480)
    run_script(*common, "--dit_path", models / "transformer", "--prompt", "x", "--distill_steps", "2",
               "--height", "32", "--width", "32", "--offload_text_encoder", "--save_path", tmp_path / "d.png")
    assert "distill_steps: 2" in (tmp_path / "d.txt").read_text()
    # --offload_text_encoder embeds with the T5 alone before the DiT loads: the same image as with both resident
    for flags, name in (([], "kept.png"), (["--offload_text_encoder"], "offloaded.png")):
        run_script(*common, "--dit_path", models / "transformer", "--prompt", "a red circle", "--negative_prompt",
                   "blurry", "--height", "32", "--width", "32", "--save_path", tmp_path / name, *flags)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "kept.png")), np.asarray(Image.open(tmp_path / "offloaded.png")))


def test_distilled_mode_runs_the_listed_sigmas():
    """x0 at sigmas 80, 3.6, 1.5574, re-noised to the next sigma with RandomState(seed + 1) draws (NVIDIA's
    convention), written out by hand; the denoiser depends on sigma, so a wrong list gives a wrong image."""
    seen = []
    x = flow.initial_noise(0, (1, 4)) * 80

    def denoise(z, sigma):
        seen.append(sigma)
        return 0.5 * z + sigma
    out = flow.sample_distilled(denoise, x.clone(), 3, seed=0)
    rng, expected = np.random.RandomState(1), x.double()
    for sigma, following in ((80.0, 3.6), (3.6, 1.5574), (1.5574, 0.0)):
        x0, noise = 0.5 * expected + sigma, torch.from_numpy(rng.standard_normal((1, 4)))
        expected = x0 + following * noise
    assert seen == [80.0, 3.6, 1.5574]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--dit_path", "missing.pt"], "no such file"),
    (["--height", "50"], "multiples of 16"),
    (["--save_path", "x.bmp"], "unsupported extension"),
    (["--load_ema"], "no EMA weights"),
    (["--save_path", "/proc/no_images_here/x.jpg"], "cannot write images to /proc/no_images_here"),
])
def test_cli_errors(tiny_bundle, flags, message):
    models = tiny_bundle / "models"
    args = ["infer_text2image.py", "--vae_path", models / "vae", "--prompt", "x", "--model_size", "tiny",
            "--dit_path", models / "transformer", *flags]
    result = run_script(*args, check=False)
    assert result.returncode != 0 and message in result.stderr


@pytest.mark.parametrize("extra_state", ["uint8_tensor", "bytesio"])
def test_transformer_engine_extra_state_loads_equal_to_diffusers_folder(base, tmp_path, extra_state):
    """Transformer Engine adds `*._extra_state` per module: a uint8 tensor (newer) or an io.BytesIO (older)."""
    import io
    state = diffusers_to_nvidia(base.state_dict(), "net.")
    for key in [k for k in state if k.endswith(".weight") and ("_proj." in k or ".layer" in k)]:
        module = key.removesuffix(".weight")
        if extra_state == "bytesio":
            buffer = io.BytesIO()
            torch.save({"fp8_meta": None}, buffer)
            state[f"{module}._extra_state"] = buffer
        else:
            state[f"{module}._extra_state"] = torch.zeros(16, dtype=torch.uint8)
    path = tmp_path / "model.pt"
    torch.save(state, path)
    with pytest.raises(Exception):  # what plain weights_only loading does with the old form
        if extra_state == "bytesio":
            torch.load(path, weights_only=True)
        else:
            raise RuntimeError("the tensor form loads anyway")
    loaded = load_dit(str(path), dtype=torch.float32).state_dict()
    reference = base.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux /proc")
def test_weights_files_are_memory_mapped_not_read(base, tmp_path):
    """Weight files are mapped, so processes of one host share the page cache instead of each reading a copy."""
    from safetensors.torch import save_file
    from cosmos_t2i.weight_files import read_weights
    state = {k: v.contiguous() for k, v in diffusers_to_nvidia(base.state_dict(), "net.").items()}
    save_file(state, tmp_path / "model.safetensors")
    torch.save(state, tmp_path / "model.pt")
    for name in ("model.safetensors", "model.pt"):
        mapped = read_weights(tmp_path / name)
        assert all(torch.equal(mapped[k], state[k]) for k in state)
        pointer = mapped["net.blocks.0.self_attn.q_proj.weight"].data_ptr()
        ranges = [[int(x, 16) for x in line.split()[0].split("-")] for line in open("/proc/self/maps")
                  if line.rstrip().endswith(str(tmp_path / name))]
        assert any(lo <= pointer < hi for lo, hi in ranges), name  # the tensor lives in a mapping of the file


def test_cli_saves_jpeg_at_quality_95(tiny_bundle, tmp_path):
    models = tiny_bundle / "models"
    out = tmp_path / "q.jpg"
    run_script("infer_text2image.py", "--dit_path", models / "transformer", "--vae_path", models / "vae",
               "--text_encoder", models / "text_encoder", "--height", "64", "--width", "64", "--dtype", "fp32",
               "--num_steps", "2", "--prompt", "a red circle", "--save_path", out)
    tables = Image.open(out).quantization
    assert max(tables[0]) <= 15  # quality 95 (PIL's default 75 has luminance entries up to about 60)


def test_legacy_format_pt_loads_and_truncated_pt_is_named(base, tmp_path):
    """torch.save(_use_new_zipfile_serialization=False) files cannot be memory-mapped: read whole, not refused as
    damaged; a cut zip-format file is named as truncated, with the fix."""
    from cosmos_t2i.weight_files import read_weights
    state = diffusers_to_nvidia(base.state_dict(), "net.")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert all(torch.equal(v, state[k]) for k, v in read_weights(tmp_path / "legacy.pt").items())
    torch.save(state, tmp_path / "cut.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "cut.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="cut.pt is a truncated or corrupted PyTorch checkpoint .*download it again"):
        read_weights(tmp_path / "cut.pt")
