"""--fp8 (float8 matmuls through torchao): clear refusals where it cannot run, and in training a model that still
learns like the bf16 one and saves the same checkpoint layout."""

import os

import pytest
import torch
from conftest import losses_of, run_script, tiny_args

from cosmos_t2i import checkpoint as ckpt
from cosmos_t2i.fp8 import is_fp8_target
from cosmos_t2i.models import new_transformer

NO_GPU = dict(os.environ, CUDA_VISIBLE_DEVICES="")


def test_fp8_targets_are_the_blocks_projections_only():
    model = new_transformer("2B", torch.bfloat16, "meta")
    targets = {n.split(".", 2)[2] for n, m in model.named_modules() if is_fp8_target(m, n)}
    assert targets == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                       "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"}
    assert sum(is_fp8_target(m, n) for n, m in model.named_modules()) == 10 * len(model.transformer_blocks)


def test_fp8_refuses_clearly_where_it_cannot_run(tiny_bundle, tmp_path):
    result = run_script(*tiny_args(tiny_bundle, tmp_path, "--fp8", "--compile"), check=False, env=NO_GPU)
    assert result.returncode == 2 and "--fp8 needs an NVIDIA GPU with float8 tensor cores" in result.stderr
    result = run_script(*tiny_args(tiny_bundle, tmp_path, "--fp8", "--train_architecture", "lora"), check=False)
    assert result.returncode == 2 and "use --lora_base_dtype fp8" in result.stderr
    infer = ["infer_text2image.py", "--dit_path", tiny_bundle / "models" / "transformer", "--vae_path",
             tiny_bundle / "models" / "vae", "--prompt", "x", "--save_path", tmp_path / "x.jpg", "--fp8"]
    result = run_script(*infer, check=False, env=NO_GPU)
    assert result.returncode == 2 and "--fp8 needs an NVIDIA GPU" in result.stderr
    result = run_script(*infer, "--dtype", "fp32", check=False)
    assert result.returncode == 2 and "use --dtype bf16" in result.stderr
    assert not (tmp_path / "posttraining").exists()


def test_fp8_training_learns_like_full_precision_and_saves_the_same_checkpoint(tiny_bundle, tmp_path):
    pytest.importorskip("torchao")  # optional dependency of --fp8
    runs = {}
    for name, extra in (("fp32", []), ("fp8", ["--fp8"])):
        args = tiny_args(tiny_bundle, tmp_path / name, "--max_iter", "6", "--save_iter", "6", *extra)
        args[0] = "tests/run_patched.py"  # lets --fp8 run on the CPU (torch has CPU float8 matmuls)
        result = run_script(*args, env=dict(os.environ, COSMOS_TEST_FP8_ON_CPU="1"))
        runs[name] = (losses_of(result.stderr), torch.load(ckpt.model_file(ckpt.checkpoint_dir(
            tmp_path / name, "posttraining", "text2image", "t"), 6), weights_only=True))
    assert "20 block projections run float8 matmuls" in result.stderr
    assert "without --compile" in result.stderr
    (fp32_losses, fp32_file), (fp8_losses, fp8_file) = runs["fp32"], runs["fp8"]
    # the checkpoint is an ordinary one: same keys, shapes and dtypes (resumable and loadable without --fp8)
    assert {k: (v.shape, v.dtype) for k, v in fp8_file.items() if torch.is_tensor(v)} == \
        {k: (v.shape, v.dtype) for k, v in fp32_file.items() if torch.is_tensor(v)}
    # the same model and data: float8 rounding moves each loss by well under a percent here, and training still learns
    assert all(abs(fp8_losses[i] - fp32_losses[i]) < 0.01 * fp32_losses[i] for i in fp32_losses), (fp8_losses,
                                                                                                  fp32_losses)
    assert fp8_losses[6] < 0.95 * fp8_losses[1]
