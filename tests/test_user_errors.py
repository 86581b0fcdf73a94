"""Mistakes a user can make with a file or a flag, run as the user runs the scripts: each ends in one line that
names what is wrong, where, and the fix, with no traceback (issue 26)."""

import os
import shutil

import pytest
import torch
from conftest import run_script

DEAD_PID = 99_999_999  # above Linux's largest process id: no process has it


def assert_one_line_error(result, *named, code=None):
    """Failed without a traceback, its last stderr line naming each of `named`; returns that line."""
    assert result.returncode != 0 and (code is None or result.returncode == code), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    for text in named:
        assert str(text) in last, last
    return last


def infer(bundle, *flags, save_path):
    """infer_text2image.py on the tiny models at 32x32, 2 steps, in fp32."""
    models = bundle / "models"
    return run_script("infer_text2image.py", "--dit_path", models / "transformer", "--vae_path", models / "vae",
                      "--text_encoder", models / "text_encoder", "--height", "32", "--width", "32", "--dtype", "fp32",
                      "--num_steps", "2", "--prompt", "a red circle", "--save_path", save_path, *flags, check=False)


def lora_for_width(path, width, rank=2, damage=None):
    """A ComfyUI LoRA on both self-attention q projections of a model `width` wide; damage='truncate' cuts it."""
    from safetensors.torch import save_file

    from cosmos_t2i.lora_formats import to_comfyui
    g = torch.Generator().manual_seed(0)
    adapter = {f"transformer_blocks.{i}.attn1.to_q": {"A": torch.randn(rank, width, generator=g),
                                                      "B": torch.randn(width, rank, generator=g) * 0.01, "alpha": 2.0}
               for i in range(2)}
    save_file(to_comfyui(adapter), str(path))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    return path


# ---------------------------------------------------------------- infer_text2image.py flags
@pytest.mark.parametrize("flags, named", [
    (["--num_steps", "0"], "--num_steps must be at least 1, got 0"),
    (["--num_steps", "-3"], "--num_steps must be at least 1, got -3"),
    (["--num_images", "0"], "--num_images must be at least 1, got 0"),
    (["--prompt", ""], "--prompt is empty"),
])
def test_infer_rejects_bad_flags_before_writing(tiny_bundle, tmp_path, flags, named):
    result = infer(tiny_bundle, *flags, save_path=tmp_path / "out" / "image.png")
    assert_one_line_error(result, "infer_text2image.py: error:", named, code=2)
    assert not list(tmp_path.rglob("*.png"))  # --num_steps 0 wrote a black image, --num_images 0 one image


@pytest.mark.parametrize("flags, named", [
    (["--seed", "-1"], "--seed must be between 0 and 4294967294"),
    (["--seed", str(2 ** 32 - 2), "--num_images", "2"], "--seed must be between 0 and 4294967293"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--guidance", "-1"], "--guidance must be a finite number of 0 or more"),
    (["--lora_scale", "inf"], "--lora_scale must be a finite number"),
    (["--height", "0"], "--height must be a positive multiple of 16, got 0"),
    (["--width", "-16"], "--width must be a positive multiple of 16, got -16"),
    (["--jpeg_quality", "0"], "--jpeg_quality must be between 1 and 100"),
    (["--sampler", "euler", "--num_steps", "1"], "--sampler euler needs --num_steps 2 or more"),
    (["--batch_input_json", "EMPTY"], "the list is empty"),
])
def test_infer_checks_every_number_up_front(tmp_path, capsys, flags, named):
    """The same checks in-process (one subprocess each would make this test slow on 2 cores)."""
    import infer_text2image

    jobs = tmp_path / "jobs.json"
    jobs.write_text("[]")
    flags = [str(jobs) if f == "EMPTY" else f for f in flags]
    with pytest.raises(SystemExit):
        infer_text2image.main(["--prompt", "x", "--save_path", str(tmp_path / "x.png"), *flags])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and named in err, err


def test_infer_checks_the_text_encoder_path_before_loading(tiny_bundle, tmp_path, capsys):
    import infer_text2image

    models = tiny_bundle / "models"
    with pytest.raises(SystemExit):
        infer_text2image.main(["--prompt", "x", "--save_path", str(tmp_path / "x.png"), "--dit_path",
                               str(models / "transformer"), "--vae_path", str(models / "vae"), "--text_encoder",
                               str(tmp_path / "t5")])
    assert f"--text_encoder {tmp_path / 't5'}: no such file or folder" in capsys.readouterr().err


def test_unloadable_text_encoder_names_it_and_the_flag(tmp_path):
    from cosmos_t2i.t5 import load_text_encoder

    (tmp_path / "config.json").write_text("{}")  # a folder that is not a T5
    with pytest.raises(OSError, match=f"cannot load the T5 encoder '{tmp_path}' .*; pass --text_encoder"):
        load_text_encoder(str(tmp_path))


def test_infer_yaml_value_of_the_wrong_type_names_the_file(tiny_bundle, tmp_path):
    config = tmp_path / "infer.yaml"
    config.write_text("num_steps: abc\n")
    result = infer(tiny_bundle, "--config", config, save_path=tmp_path / "image.png")
    assert_one_line_error(result, config, "num_steps", "is not an integer", code=2)
    assert "usage:" not in result.stderr


# ---------------------------------------------------------------- config.py, for every script
@pytest.mark.parametrize("text, named", [
    ("image_size: abc\n", ["image_size: 'abc' is not a list of 2 integers"]),
    ("max_iter: 4.5\n", ["max_iter: 4.5 is not an integer"]),
    ("scheduler: cosine\n", ["scheduler: 'cosine' is not one of lambdalinear, constant"]),
    ("lr: [0.001\n", ["not valid YAML at line 2"]),
])
def test_training_yaml_errors_name_file_key_and_type(tmp_path, capsys, text, named):
    import train_text2image
    from cosmos_t2i.cli import one_line_errors
    from cosmos_t2i.config import parse_with_config

    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit):
        parse_with_config(one_line_errors(train_text2image.build_parser()), ["--config", str(config)])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(config) in err and all(n in err for n in named), err


# ---------------------------------------------------------------- damaged or misfit weight files
@pytest.fixture(scope="module")
def damaged(tiny_bundle, tmp_path_factory):
    """Truncated copies of the tiny DiT in each weight-file form, and LoRA files (truncated, made for 0.6B)."""
    from safetensors.torch import save_file
    from diffusers import CosmosTransformer3DModel

    from cosmos_t2i.weight_files import diffusers_to_nvidia
    out = tmp_path_factory.mktemp("damaged")
    model = CosmosTransformer3DModel.from_pretrained(tiny_bundle / "models" / "transformer")
    state = {k: v.contiguous() for k, v in diffusers_to_nvidia(model.state_dict(), "net.").items()}
    torch.save(state, out / "model.pt")
    save_file(state, str(out / "model.safetensors"))
    folder = shutil.copytree(tiny_bundle / "models" / "transformer", out / "transformer")
    for path in (out / "model.pt", out / "model.safetensors", folder / "diffusion_pytorch_model.safetensors"):
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])  # an interrupted download
    lora_for_width(out / "truncated_lora.safetensors", 32, damage="truncate")
    lora_for_width(out / "lora_0.6B.safetensors", 1280)  # 0.6B's width: 20 heads x 64
    return out


TRUNCATED_DIT = [
    ("model.pt", ["model.pt is a truncated or corrupted PyTorch checkpoint"]),
    ("model.safetensors", ["model.safetensors is a truncated or corrupted safetensors file", "for tensor net."]),
    ("transformer", ["diffusion_pytorch_model.safetensors is a truncated or corrupted safetensors file"]),
]
LORA_TENSOR = "diffusion_model.blocks.{}.self_attn.q_proj.lora_{}.weight"
MISFIT = [LORA_TENSOR.format(0, "A"), "is (2, 1280) but the tiny model's", "needs (2, 32)",
          "this LoRA is for the 0.6B model; use it with a 0.6B --dit_path/--base_dit_path."]


def test_truncated_dit_file_is_one_line_naming_it(tiny_bundle, damaged, tmp_path):
    name, named = TRUNCATED_DIT[0]  # NVIDIA's model.pt form: once a 12-frame traceback
    result = infer(tiny_bundle, "--dit_path", damaged / name, "--model_size", "tiny", save_path=tmp_path / "i.png")
    last = assert_one_line_error(result, "infer_text2image.py failed: ValueError:", *named, code=1)
    assert "copy or download it again" in last and "(traceback in " in last


@pytest.mark.parametrize("name, named", TRUNCATED_DIT)
def test_truncated_dit_file_forms_name_the_file(damaged, name, named):
    from cosmos_t2i.models import load_dit
    with pytest.raises(ValueError) as error:
        load_dit(str(damaged / name), "tiny")
    assert all(n in str(error.value) for n in named) and "copy or download it again" in str(error.value)


@pytest.mark.parametrize("command", ["infer", "lora-comfyui"])
def test_truncated_lora_is_one_line_naming_file_and_tensor(tiny_bundle, damaged, tmp_path, command):
    lora = damaged / "truncated_lora.safetensors"
    if command == "infer":
        result = infer(tiny_bundle, "--lora_path", lora, save_path=tmp_path / "i.png")
    else:
        result = run_script("-m", "cosmos_t2i.export", command, "--lora_path", lora, "--output",
                            tmp_path / "out.safetensors", check=False)
    assert_one_line_error(result, " failed: ValueError:", lora, "is a truncated or corrupted safetensors file",
                          LORA_TENSOR.format(1, "B"), "copy or download it again", code=1)
    assert not (tmp_path / "out.safetensors").exists()


def test_lora_of_another_model_size_names_key_shapes_and_size(tiny_bundle, damaged, tmp_path):
    lora = damaged / "lora_0.6B.safetensors"
    result = infer(tiny_bundle, "--lora_path", lora, save_path=tmp_path / "i.png")
    assert_one_line_error(result, "infer_text2image.py failed: ValueError:", lora, *MISFIT, code=1)
    assert not list(tmp_path.iterdir())


def test_merged_export_of_damaged_or_misfit_lora_names_it(tiny_bundle, damaged):
    """The merged export's path: the LoRA file as --dit_path, merged into --base_dit_path."""
    from cosmos_t2i.models import load_dit
    base = str(tiny_bundle / "models" / "transformer")
    truncated = ["is a truncated or corrupted safetensors file", LORA_TENSOR.format(1, "B")]
    for name, named in (("truncated_lora.safetensors", truncated), ("lora_0.6B.safetensors", MISFIT)):
        with pytest.raises(ValueError) as error:
            load_dit(str(damaged / name), base_dit_path=base)
        assert str(damaged / name) in str(error.value) and all(n in str(error.value) for n in named), error.value


# ---------------------------------------------------------------- exports killed mid-write
def test_export_removes_what_a_killed_export_left(damaged, tmp_path):
    lora = lora_for_width(tmp_path / "lora.safetensors", 32)
    out = tmp_path / "exports"
    out.mkdir()
    leftover = out / f".comfy.safetensors.tmp{DEAD_PID}"  # files.temporary_name of a killed writer
    kept = [out / f".other.safetensors.tmp{DEAD_PID}",  # another output's
            out / f".comfy.safetensors.tmp{os.getpid()}",  # a writer still running
            out / ".comfy.safetensors.tmp", out / "notes.tmp1"]  # not the pattern
    for path in [leftover, *kept]:
        path.write_bytes(b"partial")
    result = run_script("-m", "cosmos_t2i.export", "lora-comfyui", "--lora_path", lora, "--output",
                        out / "comfy.safetensors")
    assert "removed 1 leftover temporary file(s) of an interrupted export" in result.stdout
    assert str(leftover) in result.stdout and not leftover.exists() and all(p.exists() for p in kept)
    assert (out / "comfy.safetensors").exists()

    folder = tmp_path / "adapter"  # a folder export: anything of the pattern inside it, staging folders too
    (folder / f".export.tmp{DEAD_PID}").mkdir(parents=True)
    (folder / f".pytorch_lora_weights.safetensors.tmp{DEAD_PID}").write_bytes(b"partial")
    run_script("-m", "cosmos_t2i.export", "lora-diffusers", "--lora_path", lora, "--output", folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "pytorch_lora_weights.safetensors"]


# ---------------------------------------------------------------- precompute_t5.py
def test_precompute_summarizes_long_captions_after_the_bar(tiny_bundle, dataset_copy):
    stems = sorted(p.stem for p in (dataset_copy / "metas").glob("*.txt"))[:2]
    for stem in stems:
        (dataset_copy / "metas" / f"{stem}.txt").write_text("a red circle on a blue background " * 4)
        (dataset_copy / "t5_xxl" / f"{stem}.pickle").unlink()
    result = run_script("precompute_t5.py", "--dataset_path", dataset_copy, "--text_encoder",
                        tiny_bundle / "models" / "text_encoder", "--max_length", "16")
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("2 of 2 captions are over the 16-token limit: ")
    assert all(f"metas/{stem}.txt" in summary for stem in stems) and "the first 16 tokens" in summary
    assert "the rest is dropped" not in result.stderr  # no longer a warning per caption on the bar's line


def test_long_caption_summary_lists_a_few_names_once(capsys):
    import precompute_t5

    precompute_t5.report_long_captions([("--prompt", 600)] * 16, 16, 512)  # one --prompt shared by 16 images
    assert capsys.readouterr().out.startswith("16 of 16 captions are over the 512-token limit: --prompt (600 tokens). ")
    precompute_t5.report_long_captions([(f"metas/{i}.txt", 600) for i in range(7)], 9, 512)
    assert "metas/4.txt (600 tokens) and 2 more. " in capsys.readouterr().out


@pytest.mark.parametrize("flags, named, code", [
    (["--batch_size", "0"], ["precompute_t5.py: error: --batch_size must be at least 1"], 2),
    (["--max_length", "600"], ["precompute_t5.py: error: --max_length must be 1 to 512"], 2),
    ([], ["precompute_t5.py failed: FileNotFoundError:", "metas does not exist", "(traceback in "], 1),
])
def test_precompute_errors_are_one_line(dataset_copy, flags, named, code):
    shutil.rmtree(dataset_copy / "metas")
    result = run_script("precompute_t5.py", "--dataset_path", dataset_copy, *flags, check=False)
    assert_one_line_error(result, *named, code=code)


def test_pipeline_refuses_zero_steps(tiny_bundle):
    from diffusers import CosmosTransformer3DModel

    from cosmos_t2i.pipeline import CosmosText2Image
    pipe = CosmosText2Image(CosmosTransformer3DModel.from_pretrained(tiny_bundle / "models" / "transformer"), None)
    embedding = torch.zeros(1, 512, 1024)
    for steps, sampler in ((0, "ab2"), (-3, "ab2"), (1, "euler")):
        with pytest.raises(ValueError, match=f"num_steps must be at least .* got {steps}"):
            pipe.sample_latents(embedding, height=32, width=32, num_steps=steps, sampler=sampler)



def test_one_line_descriptions_reach_the_root_cause():
    """A DataLoader worker's error carries its traceback in the message, DCP wraps each process's failure: the line
    a user reads is the original error, and a long one keeps its end (the fix)."""
    from torch.distributed.checkpoint.api import CheckpointException

    from cosmos_t2i.cli import describe

    worker = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1\nValueError: /d/a.jpg: cannot decode image. Replace it.\n")
    assert describe(worker) == "ValueError: /d/a.jpg: cannot decode image. Replace it."
    disk = CheckpointException("ranks", {0: (OSError(28, "No space left on device"), None)})
    assert describe(disk) == "OSError: [Errno 28] No space left on device"
    long = describe(ValueError("x" * 2000 + " Fix: do this."))
    assert len(long) < 720 and long.endswith("Fix: do this.")


def test_output_to_a_closed_pipe_never_raises(tmp_path):
    """accelerate launch >= 1.16 pipes the trainer's stderr through itself; once it is gone, writes must not end
    the trainer, and whole lines still reach the run's log file."""
    import io

    from cosmos_t2i.cli import ResilientStream

    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = ResilientStream(io.TextIOWrapper(os.fdopen(write_end, "wb", buffering=0), write_through=True))
    stream.log = open(tmp_path / "train.log", "w")
    stream.write("progress\r")  # a redrawn progress bar: terminal only
    stream.write("iter 1 loss 0.5\n" * 1000)
    stream.flush()
    assert stream.broken
    stream.log.close()
    assert (tmp_path / "train.log").read_text() == "iter 1 loss 0.5\n" * 1000


def test_a_signal_handler_writing_in_the_middle_of_a_write_is_queued_not_raised(tmp_path):
    """A stop signal's line printed while the trainer is inside a write to the same stream: the buffered file
    beneath raises RuntimeError on such a reentrant call (it ended a 2-process trainer during its stop); the line is
    written right after the interrupted one instead, in the log too."""
    import io
    import signal

    from cosmos_t2i.cli import ResilientStream

    log_path = tmp_path / "train.log"
    raw = open(tmp_path / "stderr.txt", "wb")  # a real BufferedWriter: it detects reentrant calls
    stream = ResilientStream(io.TextIOWrapper(raw, write_through=True))
    stream.log = open(log_path, "w")
    previous = signal.signal(signal.SIGUSR2, lambda *_: stream.write("SIGTERM received: saving\n"))
    original_write = raw.write

    def write_interrupted(data):  # the signal arrives while the buffered writer holds its lock
        raw.write = original_write
        os.kill(os.getpid(), signal.SIGUSR2)
        return original_write(data)

    try:
        raw.write = write_interrupted
        stream.write("iter 1 loss 0.5\n")
        stream.write("iter 2 loss 0.4\n")
    finally:
        signal.signal(signal.SIGUSR2, previous)
    stream.flush()
    stream.log.close()
    raw.close()
    expected = "iter 1 loss 0.5\nSIGTERM received: saving\niter 2 loss 0.4\n"
    assert log_path.read_text() == expected
    assert (tmp_path / "stderr.txt").read_text() == expected
