"""train_text2image.py: objective, EMA, schedule, validation, checkpoints, resume, LoRA, multi-process."""

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, losses_of, run_script, tiny_args

from cosmos_t2i import checkpoint as ckpt
from cosmos_t2i.ema import power_ema_beta, power_ema_gamma
from cosmos_t2i.flow import draw_training_randomness, flow_loss
from cosmos_t2i.lora import lora_target_modules
from cosmos_t2i.schedule import lambda_linear

import train_text2image  # noqa: E402


def load_model_file(out, iteration, name="t"):
    return ckpt.load_part(ckpt.checkpoint_dir(out, "posttraining", "text2image", name), "model", iteration)


# ---------------------------------------------------------------- objective
def reference_loss(net, x0, text, sigma, eps, keep, loss_scale=10.0):
    """NVIDIA's form, written independently: EDM x = x0 + sigma*eps, c_in/c_skip/c_out, (1+s)^2/s^2 x0 loss."""
    total = 0.0
    for i in range(x0.shape[0]):
        s = float(sigma[i])
        t = s / (1 + s)
        x_edm = x0[i:i + 1] + s * eps[i:i + 1]
        out = net(hidden_states=(1 - t) * x_edm, timestep=torch.tensor([t]), encoder_hidden_states=text[i:i + 1] *
                  float(keep[i]), padding_mask=torch.zeros(1, 1, 64, 64)).sample
        x0_pred = (1 - t) * x_edm - t * out
        total += ((1 + s) ** 2 / s ** 2 * (x0[i:i + 1] - x0_pred) ** 2).mean()
    return total / x0.shape[0] * loss_scale


def test_flow_loss_matches_nvidia_reference(tiny_bundle):
    from diffusers import CosmosTransformer3DModel
    net = CosmosTransformer3DModel.from_pretrained(tiny_bundle / "models" / "transformer").double()
    torch.manual_seed(0)
    x0, text = torch.randn(3, 16, 1, 8, 8).double(), torch.randn(3, 512, 1024).double()
    sigma, eps, keep = draw_training_randomness(0, 5, range(3), x0.shape[1:], 0.5)
    keep = torch.tensor([1.0, 0.0, 1.0])
    ours = flow_loss(net, x0, text, sigma.double(), eps.double(), keep.double(), torch.zeros(3, 1, 64, 64).double())
    torch.testing.assert_close(ours.double(), reference_loss(net, x0, text, sigma, eps.double(), keep), rtol=1e-9,
                               atol=1e-9)


def test_randomness_depends_on_sample_not_process_split():
    s_all, n_all, k_all = draw_training_randomness(7, 3, range(6), (16, 1, 4, 4), 0.2)
    s_a, n_a, _ = draw_training_randomness(7, 3, range(0, 3), (16, 1, 4, 4), 0.2)
    s_b, n_b, _ = draw_training_randomness(7, 3, range(3, 6), (16, 1, 4, 4), 0.2)
    assert torch.equal(s_all, torch.cat([s_a, s_b])) and torch.equal(n_all, torch.cat([n_a, n_b]))
    assert not torch.equal(draw_training_randomness(7, 4, range(6), (16, 1, 4, 4), 0.2)[1], n_all)
    # statistics: log sigma ~ N(0,1), dropout ~ 20%
    sig, _, keep = draw_training_randomness(0, 1, range(4000), (1,), 0.2)
    assert abs(sig.log().mean()) < 0.06 and abs(sig.log().std() - 1) < 0.05 and abs(1 - keep.mean() - 0.2) < 0.02


def test_power_ema_beta_matches_nvidia():
    gamma = power_ema_gamma(0.1)
    assert gamma == pytest.approx(6.937, abs=2e-3)
    for n, beta in [(10, 0.469), (100, 0.924), (1000, 0.9921)]:
        assert power_ema_beta(n, gamma) == pytest.approx(beta, abs=6e-4)


def test_lambda_linear_schedule():
    seed = dict(warm_up_steps=[0], cycle_lengths=[1000], f_start=[1e-6], f_max=[0.4], f_min=[0.0])
    assert lambda_linear(0, **seed) == pytest.approx(0.4)
    assert lambda_linear(500, **seed) == pytest.approx(0.2)
    assert lambda_linear(1000, **seed) == pytest.approx(0.0)
    two = dict(warm_up_steps=[10, 0], cycle_lengths=[100, 50], f_start=[0.0, 0.0], f_max=[1.0, 0.5],
               f_min=[0.1, 0.0])
    assert lambda_linear(0, **two) == 0.0 and lambda_linear(5, **two) == pytest.approx(0.5)
    assert lambda_linear(10, **two) == pytest.approx(1.0)
    assert lambda_linear(55, **two) == pytest.approx(0.1 + 0.9 * 45 / 90)
    assert lambda_linear(100, **two) == pytest.approx(0.1)
    assert lambda_linear(101, **two) == pytest.approx(0.5 * 49 / 50)  # restart: second cycle


# ---------------------------------------------------------------- interface
@pytest.mark.parametrize("flags, message", [
    (["--max_iter", "2000"], "exceeds sum(--cycle_lengths)"),
    (["--context_parallel_size", "2"], "context parallelism"),
    (["--warm_up_steps", "0", "10"], "one value per cycle"),
    (["--image_size", "100", "64"], "multiples of 16"),
    (["--validation_prompts", "a cat"], "--validation_iter"),
    (["--keep_last", "0"], "--keep_last"),
    (["--batch_size", "0"], "--batch_size"),
    (["--caption_dropout", "1.5"], "probability"),
    (["--lr", "0"], "--lr"),
    (["--betas", "0.9", "1.0"], "--betas"),
    (["--ema_rate", "1.5"], "--ema_rate"),
    (["--dit_path", "/weights/nowhere/model.pt"], "no such file or folder"),
    (["--dit_path", "checkpoints/not/here"], "no such file or folder"),
    (["--max_wall_time", "tomorrow"], "--max_wall_time"),
])
def test_invalid_combinations_fail_before_loading(flags, message, capsys):
    with pytest.raises(SystemExit):
        train_text2image.main(["--dataset_dir", str(ROOT), "--vae_path", "nowhere", *flags])
    assert message in capsys.readouterr().err


def test_config_file_and_cli_precedence(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model_size: 14B\nlr: 0.5\nmax_iter: 200\n")
    train_text2image.main(["--config", str(config), "--lr", "0.25", "--dryrun"])
    out = capsys.readouterr().out
    assert "model_size: 14B" in out and "lr: 0.25" in out and "max_iter: 200" in out
    config.write_text("not_a_flag: 1\n")
    with pytest.raises(SystemExit):
        train_text2image.main(["--config", str(config), "--dryrun"])
    assert "not_a_flag" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("image_size: 64\n", "--image_size: expected 2 arguments"),
    ("lr: [0.001]\n", "lr: expected one value"),
    ("max_iter: 4.5\n", "invalid int value: '4.5'"),
    ("ema: 'false'\n", "ema: expected true or false"),
    ("scheduler: cosine\n", "invalid choice"),
])
def test_yaml_values_are_checked_like_flags(tmp_path, capsys, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit):
        train_text2image.main(["--config", str(config), "--dryrun"])
    assert message in capsys.readouterr().err
    config.write_text("ema: false\nbetas: [0.8, 0.95]\nmax_iter: 500\ncycle_lengths: 500\n")
    train_text2image.main(["--config", str(config), "--dryrun", "--max_iter", "400"])
    out = capsys.readouterr().out
    assert "ema: false" in out and "- 0.8" in out and "max_iter: 400" in out and "cycle_lengths:\n- 500" in out


def test_vae_path_given_the_dit_says_so(tiny_bundle):
    from cosmos_t2i.models import load_vae
    with pytest.raises(ValueError, match="CosmosTransformer3DModel, not a VAE"):
        load_vae(str(tiny_bundle / "models" / "transformer"))


def test_seed_example_configs_parse(capsys):
    """The seed's two experiments as YAML: their own values (not argparse defaults) reach the resolved config."""
    for name, size in (("2b_custom_data.yaml", "2B"), ("14b_custom_data.yaml", "14B")):
        train_text2image.main(["--config", str(ROOT / "examples" / name), "--dryrun"])
        out = capsys.readouterr().out
        assert f"dit_path: checkpoints/nvidia/Cosmos-Predict2-{size}-Text2Image/model.pt" in out
        assert f"name: {size.lower()}_custom_data" in out and f"model_size: {size}" in out
        assert "dataset_dir: datasets/custom_text2image_dataset" in out
        assert "f_max:\n- 0.4" in out and "max_iter: 1000" in out and "save_iter: 500" in out


# ---------------------------------------------------------------- training runs
def test_training_learns_and_conditions_on_captions(tiny_bundle, tmp_path):
    out = tmp_path / "ck"
    result = run_script(*tiny_args(tiny_bundle, out, "--max_iter", "150", "--save_iter", "150", "--no-ema"))
    losses = list(losses_of(result.stderr).values())
    assert len(losses) == 150
    fifth = len(losses) // 5
    first, last = sum(losses[:fifth]) / fifth, sum(losses[-fifth:]) / fifth
    assert last < 0.8 * first, (first, last)

    # sample each caption; the result must land nearer its own class's mean latent than the other's
    from cosmos_t2i.data import ImageDataset
    from cosmos_t2i.models import encode_images, load_vae
    from cosmos_t2i.pipeline import CosmosText2Image
    pipe = CosmosText2Image.from_pretrained(dit_path=str(out / "posttraining/text2image/t"), model_size="tiny",
                                            vae_path=str(tiny_bundle / "models/vae"),
                                            text_encoder=str(tiny_bundle / "models/text_encoder"), dtype=torch.float32)
    data = ImageDataset(tiny_bundle / "dataset", (64, 64))
    vae = load_vae(str(tiny_bundle / "models/vae"), torch.float32)
    latents = encode_images(vae, torch.stack([data[i]["images"] for i in range(len(data))]))
    classes = torch.tensor([int(s["name"][-1]) for s in data.source.samples])
    means = [latents[classes == c].mean(0) for c in (0, 1)]
    captions = ["a red circle on a blue background", "a yellow square on a green background"]
    for c, caption in enumerate(captions):
        sample = pipe.sample_latents(pipe.encode([caption] * 4), seeds=range(4), height=64, width=64, num_steps=20)
        own, other = ((sample - means[c]) ** 2).mean(), ((sample - means[1 - c]) ** 2).mean()
        assert own < other, (caption, own, other)


def test_model_file_has_nvidia_keys_and_loads_in_diffusers_converter(tiny_bundle, tmp_path):
    from diffusers import CosmosTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers
    out = tmp_path / "ck"
    run_script(*tiny_args(tiny_bundle, out, "--max_iter", "3", "--save_iter", "3"))
    state = load_model_file(out, 3)
    assert "net.blocks.0.self_attn.q_proj.weight" in state and "net_ema.final_layer.linear.weight" in state
    assert state["net.blocks.0.mlp.layer1.weight"].dtype == torch.bfloat16
    assert state["net_ema.blocks.0.mlp.layer1.weight"].dtype == torch.float32
    net = {k: v for k, v in state.items() if k.startswith("net.")}
    converted = convert_cosmos_transformer_checkpoint_to_diffusers(dict(net))
    reference = CosmosTransformer3DModel.from_pretrained(tiny_bundle / "models" / "transformer").state_dict()
    assert set(converted) == set(reference)
    d = ckpt.checkpoint_dir(out, "posttraining", "text2image", "t")
    for f in ("scheduler", "trainer"):  # every file loads with weights_only=True
        ckpt.load_part(d, f, 3)
    # the training state: fp32 masters, Adam moments and the EMA, keyed by parameter name
    masters, optim, ema = (ckpt.read_shards(ckpt.shards_dir(d, 3), p) for p in ("model", "optim", "ema"))
    assert masters["transformer_blocks.0.attn1.to_q.weight"].dtype == torch.float32
    assert "transformer_blocks.0.attn1.to_q.weight.exp_avg_sq" in optim
    torch.testing.assert_close(ema["proj_out.weight"], state["net_ema.final_layer.linear.weight"])


def test_resume_is_exact_and_finished_run_exits(tiny_bundle, tmp_path):
    straight, split = tmp_path / "a", tmp_path / "b"
    full = run_script(*tiny_args(tiny_bundle, straight, "--max_iter", "8", "--save_iter", "4"))
    run_script(*tiny_args(tiny_bundle, split, "--max_iter", "4", "--save_iter", "4"))
    resumed = run_script(*tiny_args(tiny_bundle, split, "--max_iter", "8", "--save_iter", "4"))
    assert "resumed from" in resumed.stderr and "max_iter: 4 -> 8" in resumed.stderr
    a, b = losses_of(full.stderr), losses_of(resumed.stderr)
    assert [a[i] for i in range(5, 9)] == [b[i] for i in range(5, 9)]
    da, db = (ckpt.checkpoint_dir(o, "posttraining", "text2image", "t") for o in (straight, split))
    fa, fb = (torch.load(ckpt.model_file(d, 8), weights_only=True) for d in (da, db))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    for prefix in ("model", "optim", "ema"):
        sa, sb = (ckpt.read_shards(ckpt.shards_dir(d, 8), prefix) for d in (da, db))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), prefix
    (db.parent / "exit_code").write_text("75\n")  # left by an earlier stop
    again = run_script(*tiny_args(tiny_bundle, split, "--max_iter", "8"))
    assert "already finished" in again.stdout + again.stderr
    assert (db.parent / "exit_code").read_text() == "0\n"  # what a job script reads: finished, not to be requeued
    # a changed learning rate on resume is what runs from there on, and the run folder records the change
    changed_lr = run_script(*tiny_args(tiny_bundle, split, "--max_iter", "10", "--lr", "1e-4"))
    assert "lr: 0.001 -> 0.0001" in changed_lr.stderr
    assert re.search(r"iter 9 loss \S+ lr 1\.000e-04", changed_lr.stderr), changed_lr.stderr[-2000:]
    run = split / "posttraining" / "text2image" / "t"
    assert "lr: 0.0001" in (run / "config.yaml").read_text()
    history = (run / "config_history.yaml").read_text()
    assert "resumed_at_iteration: 8" in history and "from: 0.001" in history
    changed = run_script(*tiny_args(tiny_bundle, split, "--max_iter", "12", "--image_size", "32", "32"), check=False)
    assert changed.returncode != 0 and "image_size" in changed.stderr
    assert not (db.parent / "exit_code").exists()  # failed: no code recorded, the launcher's stands


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """A save that fails in the background leaves the previous checkpoint latest and raises on the next wait."""
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    saver = ckpt.Checkpointer(tmp_path, model, optimizer, scheduler, keep_last=1)

    def step():
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    saver.save(10, {"rng": {"torch": torch.get_rng_state()}})
    saver.wait()
    saved = model.weight.detach().clone()
    step()

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt, "write_model_file", disk_full)
    saver.save(20, {"rng": {"torch": torch.get_rng_state()}})
    with pytest.raises(ckpt.SaveFailed, match="iter_000000020.pt not saved .*No space left.* iter_000000010.pt stays"):
        saver.wait()
    assert ckpt.latest_iteration(tmp_path) == 10 and ckpt.shards_dir(tmp_path, 10).is_dir()
    assert ckpt.saved_iterations(tmp_path) == [10]  # the partial checkpoint is removed
    assert not list(tmp_path.rglob(".*tmp*"))  # no half-written file left behind
    trainer = saver.restore(10)
    assert trainer["iteration"] == 10 and torch.equal(model.weight, saved)
    monkeypatch.undo()
    saver.save(30, {"rng": {"torch": torch.get_rng_state()}})
    saver.wait()
    assert ckpt.latest_iteration(tmp_path) == 30 and not ckpt.shards_dir(tmp_path, 10).exists()
    assert not ckpt.model_file(tmp_path, 10).exists()


def test_killed_during_save_leaves_a_usable_checkpoint(tiny_bundle, tmp_path):
    """SIGKILL the trainer while its background save of iteration 4 writes; iteration 2 stays latest and resumes."""
    out = tmp_path / "ck"
    env = dict(os.environ, COSMOS_TEST_KILL_IN_MODEL_FILE="4")
    died = run_script("tests/run_patched.py", *tiny_args(tiny_bundle, out, "--max_iter", "6", "--save_iter", "2")[1:],
                      check=False, env=env)
    assert died.returncode == -9, died.stderr[-2000:]
    d = ckpt.checkpoint_dir(out, "posttraining", "text2image", "t")
    assert ckpt.latest_iteration(d) == 2
    resumed = run_script(*tiny_args(tiny_bundle, out, "--max_iter", "4", "--save_iter", "2"))
    assert "resumed from" in resumed.stderr and "at iteration 2" in resumed.stderr and ckpt.latest_iteration(d) == 4


def test_lora_trains_only_adapters_and_reloads(tiny_bundle, tmp_path):
    from diffusers import CosmosTransformer3DModel
    from cosmos_t2i.models import load_dit
    out = tmp_path / "ck"
    run_script(*tiny_args(tiny_bundle, out, "--train_architecture", "lora", "--lora_rank", "4", "--lora_alpha", "8",
                          "--max_iter", "6", "--save_iter", "6", "--lr", "1e-2"))
    state = load_model_file(out, 6)
    weights = [k for k in state if k != "lora_metadata"]
    assert weights and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in weights)
    assert "net.blocks.0.self_attn.q_proj.lora_A.weight" in state and "net.blocks.1.mlp.layer2.lora_B.weight" in state
    assert "net_ema.blocks.0.cross_attn.output_proj.lora_B.weight" in state
    meta = state["lora_metadata"]
    assert meta["rank"] == 4 and meta["alpha"] == 8 and meta["base_fingerprint"]
    # the base is untouched: the training state holds only adapters
    d = ckpt.checkpoint_dir(out, "posttraining", "text2image", "t")
    masters = {ckpt.canonical_name(k): v for k, v in ckpt.read_shards(ckpt.shards_dir(d, 6), "model").items()}
    assert masters and all("lora_" in k for k in masters)

    base = CosmosTransformer3DModel.from_pretrained(tiny_bundle / "models" / "transformer").eval()
    loaded = load_dit(str(ckpt.checkpoint_dir(out, "posttraining", "text2image", "t")), dtype=torch.float32)
    # reference: the trained adapter through PEFT itself, unmerged
    from peft import LoraConfig, set_peft_model_state_dict
    trained = CosmosTransformer3DModel.from_pretrained(tiny_bundle / "models" / "transformer").eval()
    trained.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_modules(meta["target_modules"])))
    set_peft_model_state_dict(trained, masters)
    x, t, ctx = torch.randn(2, 16, 1, 8, 8), torch.tensor([0.3, 0.8]), torch.randn(2, 512, 1024)
    pm = torch.zeros(1, 1, 64, 64)
    with torch.no_grad():
        y_loaded, y_trained, y_base = (m(x, t, ctx, padding_mask=pm).sample for m in (loaded, trained, base))
    torch.testing.assert_close(y_loaded, y_trained, rtol=1e-4, atol=1e-5)
    assert (y_loaded - y_base).abs().max() > 1e-3  # unlike NVIDIA's loader, the LoRA is really applied


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process on Linux")
def test_two_processes_match_one(tiny_bundle, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--max_iter", "3", "--save_iter", "3", "--lr", "1e-4"]
    single = run_script(*tiny_args(tiny_bundle, one, *common))
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    args = tiny_args(tiny_bundle, two, *common)
    args[args.index("--batch_size") + 1] = "2"  # 2 processes x 2 = the same global batch of 4
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                             "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                             "--main_process_port", "29517", *map(str, args)], cwd=ROOT, capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    a, b = losses_of(single.stderr), losses_of(result.stderr)
    assert a.keys() == b.keys() and all(abs(a[i] - b[i]) < 1e-5 * max(1, abs(a[i])) for i in a)
    sa, sb = load_model_file(one, 3), load_model_file(two, 3)
    for k in sa:
        if k.startswith("net_ema."):
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-5)
    ma, mb = (ckpt.read_shards(ckpt.shards_dir(ckpt.checkpoint_dir(o, "posttraining", "text2image", "t"), 3), "model")
              for o in (one, two))
    for k in ma:  # fp32 weights after 3 AdamW steps
        torch.testing.assert_close(ma[k], mb[k], rtol=1e-5, atol=1e-5)
    # the 2-process checkpoint resumes in 1 process (batch 4 again) and matches the 1-process run
    more = ["--max_iter", "5", "--save_iter", "5", "--lr", "1e-4"]
    resumed = run_script(*tiny_args(tiny_bundle, two, *more))
    assert "resumed from" in resumed.stderr and "batch_size: 2 -> 4" in resumed.stderr
    run_script(*tiny_args(tiny_bundle, one, *more))
    ma, mb = (ckpt.read_shards(ckpt.shards_dir(ckpt.checkpoint_dir(o, "posttraining", "text2image", "t"), 5), "model")
              for o in (one, two))
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=1e-5, atol=1e-5)


def test_validation_tensorboard_and_8bit_optimizer(tiny_bundle, tmp_path):
    out = tmp_path / "ck"
    args = tiny_args(tiny_bundle, out, "--max_iter", "4", "--save_iter", "4", "--optimizer", "adamw8bit",
                     "--validation_prompts", "a red circle", "a yellow square", "--validation_iter", "2",
                     "--validation_steps", "3", "--text_encoder", tiny_bundle / "models" / "text_encoder")
    args[args.index("--report_to") + 1] = "tensorboard"
    run_script(*args)
    run = out / "posttraining" / "text2image" / "t"
    assert sorted(p.name for p in (run / "validation").iterdir()) == [
        "iter_000000002_0.jpg", "iter_000000002_1.jpg", "iter_000000004_0.jpg", "iter_000000004_1.jpg"]
    assert list(run.rglob("events.out.tfevents*"))
    optim = torch.load(ckpt.shards_dir(run / "checkpoints", 4) / "optimizer_8bit.pt", weights_only=True)
    assert any(t.dtype == torch.uint8 for t in ckpt.tensors_in(optim["state"]))


def test_gradient_checkpointing_gives_the_same_losses(tiny_bundle, tmp_path):
    plain = run_script(*tiny_args(tiny_bundle, tmp_path / "a", "--max_iter", "3", "--save_iter", "3"))
    ckpted = run_script(*tiny_args(tiny_bundle, tmp_path / "b", "--max_iter", "3", "--save_iter", "3",
                                   "--gradient_checkpointing"))
    a, b = losses_of(plain.stderr), losses_of(ckpted.stderr)
    assert a.keys() == b.keys() and all(abs(a[i] - b[i]) < 1e-6 * abs(a[i]) for i in a)


def test_nonfinite_losses_skip_then_stop_with_checkpoint_intact(tiny_bundle, tmp_path):
    out = tmp_path / "ck"
    run_script(*tiny_args(tiny_bundle, out, "--max_iter", "2", "--save_iter", "2"))
    result = run_script(*tiny_args(tiny_bundle, out, "--max_iter", "10", "--save_iter", "2", "--loss_scale", "nan",
                                   "--max_nonfinite", "3"), check=False)
    assert result.returncode != 0 and "3 non-finite losses in a row" in result.stderr
    assert result.stderr.count("non-finite loss, step skipped") == 3
    d = ckpt.checkpoint_dir(out, "posttraining", "text2image", "t")
    assert ckpt.latest_iteration(d) == 2 and ckpt.load_part(d, "model", 2)


def test_bf16_weights_with_stochastic_rounding_move_like_fp32():
    """At lr 1e-5 round-to-nearest bf16 updates vanish; stochastic rounding tracks the fp32 trajectory."""
    from cosmos_t2i.schedule import StochasticAdamW
    torch.manual_seed(0)
    target = torch.randn(256, 64) * 0.02
    start = (torch.randn(256, 64) * 0.02 + 1.0)  # weights near 1: bf16 spacing 2^-7, far above lr
    x = torch.randn(512, 64)

    def loss_of(weight):
        return ((x @ weight.float().T - x @ target.T) ** 2).mean()

    def run(weight, optimizer, steps=200):
        for _ in range(steps):
            loss_of(weight).backward()
            optimizer.step()
            optimizer.zero_grad()
        return weight.detach().float()

    w32 = torch.nn.Parameter(start.clone())
    moved32 = run(w32, torch.optim.AdamW([w32], lr=1e-5, weight_decay=0.0)) - start
    w_sr = torch.nn.Parameter(start.clone().bfloat16())
    moved_sr = run(w_sr, StochasticAdamW([w_sr], lr=1e-5, weight_decay=0.0)) - start.bfloat16().float()
    w_rn = torch.nn.Parameter(start.clone().bfloat16())
    moved_rn = run(w_rn, torch.optim.AdamW([w_rn], lr=1e-5, weight_decay=0.0)) - start.bfloat16().float()
    assert moved32.abs().mean() > 1e-3  # 200 steps of ~1e-5
    assert moved_rn.abs().max() == 0  # plain bf16: every update rounds away
    assert abs(moved_sr.mean() - moved32.mean()) < 0.1 * moved32.abs().mean()
    with torch.no_grad():  # the loss falls as far as in fp32
        initial = loss_of(start)
        drop32, drop_sr = initial - loss_of(w32), initial - loss_of(w_sr)
    assert drop32 > 0 and abs(drop_sr - drop32) < 0.2 * drop32, (drop32, drop_sr)


def test_bf16_weight_training_runs(tiny_bundle, tmp_path):
    result = run_script(*tiny_args(tiny_bundle, tmp_path, "--max_iter", "3", "--save_iter", "3",
                                   "--weight_dtype", "bf16", "--no-ema", "--gradient_checkpointing"))
    assert len(losses_of(result.stderr)) == 3
    state = load_model_file(tmp_path, 3)
    assert not any(k.startswith("net_ema.") for k in state)
    bad = run_script(*tiny_args(tiny_bundle, tmp_path / "x", "--weight_dtype", "bf16", "--optimizer", "adamw8bit"),
                     check=False)
    assert bad.returncode != 0 and "stochastic-rounding" in bad.stderr


def test_training_starts_from_a_run_folder_or_lora_file_like_inference(tiny_bundle, tmp_path):
    """--dit_path takes the forms inference takes: a LoRA run folder (or its model file) is its base with the
    adapter merged, so a full fine-tune continues from exactly what load_dit gives."""
    from cosmos_t2i.models import load_dit
    lora_run = tmp_path / "lora"
    run_script(*tiny_args(tiny_bundle, lora_run, "--train_architecture", "lora", "--max_iter", "2", "--lr", "1e-2"))
    lora_dir = ckpt.checkpoint_dir(lora_run, "posttraining", "text2image", "t")
    expected = load_dit(str(lora_dir.parent), dtype=torch.float32).state_dict()
    for source in (lora_dir.parent, ckpt.model_file(lora_dir, 2)):
        out = tmp_path / f"full_{source.name}"
        run_script(*tiny_args(tiny_bundle, out, "--dit_path", source, "--max_iter", "1", "--lr", "1e-12", "--no-ema"))
        d = ckpt.checkpoint_dir(out, "posttraining", "text2image", "t")
        start = {ckpt.canonical_name(k): v for k, v in ckpt.read_shards(ckpt.shards_dir(d, 1), "model").items()}
        assert start.keys() == expected.keys()
        for k in expected:  # one AdamW step at lr 1e-12 moves nothing visible
            torch.testing.assert_close(start[k], expected[k], rtol=0, atol=1e-9, msg=k)
    base = load_dit(str(tiny_bundle / "models" / "transformer"), dtype=torch.float32).state_dict()
    assert any((base[k] - expected[k]).abs().max() > 1e-4 for k in expected)  # the adapter is in there


@pytest.mark.parametrize("poison", [None, float("nan"), float("inf")])
def test_gradient_clip_zeroes_nonfinite_entries_then_clips_like_torch(poison):
    """NVIDIA's GradClip(force_finite=True) against torch's clip_grad_norm_ on gradients zeroed by hand."""
    from cosmos_t2i.distributed import clip_grad_norm_
    grads = [torch.randn(5, 3, generator=torch.Generator().manual_seed(i)) * 2 for i in range(3)]
    if poison is not None:
        grads[1][2, 1] = poison
    ours = [torch.nn.Parameter(torch.zeros(5, 3)) for _ in grads]
    reference = [torch.nn.Parameter(torch.zeros(5, 3)) for _ in grads]
    for p, q, g in zip(ours, reference, grads):
        p.grad, q.grad = g.clone(), torch.nan_to_num(g.clone(), nan=0.0, posinf=0.0, neginf=0.0)
    norm = clip_grad_norm_(ours, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(reference, 1.0)
    torch.testing.assert_close(norm, expected)
    for p, q in zip(ours, reference):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("poison", [None, float("nan")])
def test_clipping_inside_fused_adamw_equals_clipping_first(poison):
    """apply_gradients hands the clipping factor to fused AdamW's kernel instead of scaling the gradients: the same
    norms, weights and moments as clipping first (torch's clip_grad_norm_ on zeroed gradients) then stepping
    foreach AdamW, over steps that clip and one that does not; no factor outlives its step."""
    from cosmos_t2i.schedule import make_optimizer, make_scheduler
    from cosmos_t2i.update import apply_gradients

    shapes = [(6, 4), (5,), (3, 2)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    optimizer = make_optimizer(ours, lr=1e-2, weight_decay=0.2, device_type="cpu")
    assert optimizer.defaults["fused"]
    reference_optimizer = torch.optim.AdamW(reference, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.2, foreach=True)
    scheduler = make_scheduler(optimizer, "constant")
    for step, size in enumerate([3.0, 5.0, 0.01], start=1):  # global norms ~10, ~17 (clipped), ~0.06 (not)
        grads = [torch.randn(s, generator=torch.Generator().manual_seed(10 * step + i)) * size
                 for i, s in enumerate(shapes)]
        if poison is not None and step == 2:
            grads[1][3] = poison
        for p, q, g in zip(ours, reference, grads):
            p.grad, q.grad = g.clone(), torch.nan_to_num(g, nan=0.0)
        norm = apply_gradients(ours, optimizer, scheduler, None, 1.0, step)
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(reference, 1.0))
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        assert not hasattr(optimizer, "grad_scale")
        for p, q in zip(ours, reference):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(optimizer.state[p]["exp_avg_sq"], reference_optimizer.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_update_is_queued_before_the_read_and_dropped_on_the_device_when_told(kind):
    """start_update queues fused AdamW's step before the host reads (the weights move without a read); a `skip` flag
    or a non-finite norm makes that step a no-op (weights, moments and step count untouched) and finish_update then
    takes NVIDIA's path; other optimizers step only in finish_update. Every kept step equals clipping first (torch's
    clip_grad_norm_ on zeroed gradients) then torch's foreach AdamW; the read gives the values asked for."""
    from cosmos_t2i.schedule import make_optimizer, make_scheduler
    from cosmos_t2i.update import finish_update, start_update
    import weakref

    shapes = [(6, 4), (5,)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    optimizer = (make_optimizer(ours, lr=1e-2, weight_decay=0.2, device_type="cpu") if kind == "fused" else
                 torch.optim.AdamW(ours, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.2, foreach=True))
    reference_optimizer = torch.optim.AdamW(reference, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.2, foreach=True)
    scheduler = make_scheduler(optimizer, "constant")

    def state():
        return [p.detach().clone() for p in ours] + [t.clone() for s in optimizer.state.values() for t in s.values()]

    # (gradient size, a skip flag or None, a NaN in the gradients): kept, skipped, kept with a non-finite norm, kept
    for step, (size, skip, poison) in enumerate([(5.0, None, False), (5.0, True, False), (3.0, False, True),
                                                 (0.01, False, False)], start=1):
        grads = [torch.randn(s, generator=torch.Generator().manual_seed(10 * step + i)) * size
                 for i, s in enumerate(shapes)]
        if poison:
            grads[1][3] = float("nan")
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        before = state()
        pending = start_update(ours, optimizer, 1.0, read=[torch.tensor([7.0, 1.0])],
                               skip=None if skip is None else torch.tensor(skip))
        moved = any(not torch.equal(a, b) for a, b in zip(before, state()))
        assert moved == (kind == "fused" and not skip and not poison)
        assert not hasattr(optimizer, "grad_scale") and not hasattr(optimizer, "found_inf")
        assert pending.read() == [7.0, 1.0]
        if skip:  # the caller drops the step: nothing changed, and finishing it is refused
            assert all(torch.equal(a, b) for a, b in zip(before, state()))
            with pytest.raises(RuntimeError, match="told to skip"):
                finish_update(pending, ours, optimizer, scheduler, None, 1.0, step)
            optimizer.zero_grad(set_to_none=True)
            continue
        released = weakref.ref(ours[0].grad)
        norm = finish_update(pending, ours, optimizer, scheduler, None, 1.0, step)
        assert released() is None  # the pending update (kept by the loop through the next backward) holds no gradient
        for q, g in zip(reference, grads):
            q.grad = torch.nan_to_num(g, nan=0.0)
        expected = torch.nn.utils.clip_grad_norm_(reference, 1.0)
        torch.testing.assert_close(norm, expected)
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        assert all(p.grad is None for p in ours)
        for p, q in zip(ours, reference):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(optimizer.state[p]["exp_avg_sq"], reference_optimizer.state[q]["exp_avg_sq"])
            torch.testing.assert_close(optimizer.state[p]["step"], reference_optimizer.state[q]["step"])


def test_float8_storage_linear_computes_like_the_linear():
    from cosmos_t2i.lora import Float8StorageLinear
    linear = torch.nn.Linear(64, 32).requires_grad_(False)
    x = torch.randn(8, 64)
    expected = linear(x)
    Float8StorageLinear.convert_(linear)
    assert linear.weight.dtype == torch.float8_e5m2 and linear.weight.element_size() == 1
    got = linear(x)
    assert (got - expected).norm() / expected.norm() < 0.1  # e5m2 keeps 2 mantissa bits: a few % error


def test_lora_on_an_fp8_base_saves_the_same_adapters_and_warns_when_merged(tiny_bundle, tmp_path, caplog):
    import logging
    from cosmos_t2i.models import load_dit
    runs = {}
    for dtype in ("bf16", "fp8"):
        out = tmp_path / dtype
        result = run_script(*tiny_args(tiny_bundle, out, "--train_architecture", "lora", "--max_iter", "3",
                                       "--lr", "1e-2", "--lora_base_dtype", dtype))
        runs[dtype] = (out, losses_of(result.stderr), load_model_file(out, 3))
    assert "frozen block weights stored in fp8" in result.stderr
    (_, bf16_losses, bf16_file), (fp8_out, fp8_losses, fp8_file) = runs["bf16"], runs["fp8"]
    assert {k: (v.shape, v.dtype) for k, v in fp8_file.items() if torch.is_tensor(v)} == \
        {k: (v.shape, v.dtype) for k, v in bf16_file.items() if torch.is_tensor(v)}
    assert fp8_file["lora_metadata"]["base_dtype"] == "fp8"
    assert abs(fp8_losses[1] - bf16_losses[1]) < 0.05 * bf16_losses[1]  # the same model, up to fp8 storage error
    with caplog.at_level(logging.WARNING):
        load_dit(str(fp8_out / "posttraining/text2image/t"), dtype=torch.float32)
    assert "stored in fp8" in caplog.text


def test_pinned_save_buffers_only_when_a_background_save_comes():
    """The save at max_iter (and a stop save) is synchronous; only saves before it use the pinned buffers."""
    from cosmos_t2i.training import background_save_ahead
    assert background_save_ahead(1, 500, 1000)  # iteration 500 is saved in the background
    assert not background_save_ahead(1, 1000, 1000)  # the only save is the last, synchronous one
    assert not background_save_ahead(501, 500, 1000)  # resumed after the last background save
    assert background_save_ahead(500, 500, 1000)  # the save of this very iteration
    assert background_save_ahead(1, 1, 2) and not background_save_ahead(2, 1, 2)


def test_profile_kernel_time_by_kind_counts_overlap_once(tmp_path):
    from cosmos_t2i.monitor import kernel_time_by_kind

    kernels = [("sm90_xmma_gemm_bf16bf16_bf16f32", 0, 10), ("ncclDevKernel_AllGather_RING_LL", 5, 15),
               ("triton_poi_fused__to_copy_abs_amax_0", 30, 5), ("flash_fwd_kernel", 50, 10),
               ("multi_tensor_apply_kernel", 62, 3), ("void at::native::elementwise_kernel", 63, 4),
               ("triton_tem_fused_mm_1", 70, 2)]
    events = [{"cat": "kernel", "name": n, "ts": ts, "dur": d} for n, ts, d in kernels]
    events += [{"cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 40, "dur": 1},
               {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100}]  # host events are not GPU time
    (tmp_path / "trace.json").write_text(__import__("json").dumps({"traceEvents": events}))
    got = kernel_time_by_kind(tmp_path / "trace.json", iterations=2)
    busy_us = len({t for e in events if e["cat"] != "cpu_op" for t in range(e["ts"], e["ts"] + e["dur"])})
    assert got["busy_ms"] == pytest.approx(busy_us / 2e3)
    assert got == pytest.approx({"busy_ms": busy_us / 2e3, "matmul_ms": 12 / 2e3, "nccl_ms": 15 / 2e3,
                                 "triton_ms": 5 / 2e3, "attention_ms": 10 / 2e3, "multi_tensor_ms": 3 / 2e3,
                                 "other_ms": 4 / 2e3, "copies_ms": 1 / 2e3})


def test_trace_gaps_charges_idle_time_to_the_launch_that_ends_it(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from trace_gaps import gaps

    def kernel(ts, dur, corr):
        return {"cat": "kernel", "name": "k", "ts": ts, "dur": dur, "tid": 7, "args": {"correlation": corr}}

    def launch(ts, corr):
        return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "tid": 1,
                "args": {"correlation": corr}}
    host = [{"cat": "user_annotation", "name": "optimizer_step", "ts": 100, "dur": 100, "tid": 1},
            {"cat": "cpu_op", "name": "aten::_fused_adamw_", "ts": 110, "dur": 50, "tid": 1},
            {"cat": "cpu_op", "name": "aten::item", "ts": 20, "dur": 5, "tid": 1}]
    events = host + [kernel(0, 10, 1), launch(5, 1), kernel(40, 10, 2), launch(22, 2),  # 30 us gap after an item()
                     kernel(52, 100, 3), launch(30, 3),  # 2 us: below the threshold
                     kernel(170, 10, 4), launch(150, 4)]  # 18 us gap, launched inside the optimizer step
    (tmp_path / "trace.json").write_text(__import__("json").dumps({"traceEvents": events}))
    got = gaps(tmp_path / "trace.json", min_gap_us=5)
    assert got["gaps"] == 2 and got["span_ms"] == pytest.approx(0.18) and got["idle_ms"] == pytest.approx(0.048)
    assert got["idle_ms_by_launch_site"] == {"- / aten::item": 0.03, "optimizer_step / aten::_fused_adamw_": 0.018}
