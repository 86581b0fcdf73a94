"""The training script on several CPU processes: FSDP2 through Accelerate equals one process, and its sharded
checkpoints resume on any other process count with the same results."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, free_port, losses_of, run_script, tiny_args

from cosmos_t2i import checkpoint as ckpt
from cosmos_t2i import run_folder
from cosmos_t2i.models import load_dit
from cosmos_t2i.run_control import EXIT_CODE_FILE

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process on Linux")
GLOBAL_BATCH = 4


def run(n, bundle, out, *extra, fsdp=True, port=None, timeout=900, env=None):
    """train_text2image.py on n CPU processes (FSDP2 when n > 1), global batch 4; returns its losses (the launch's
    output is kept in out/launch.log)."""
    args = tiny_args(bundle, out, "--lr", "1e-4", *extra)
    args[args.index("--batch_size") + 1] = str(GLOBAL_BATCH // n)  # extra --batch_size overrides
    args[0] = "tests/run_patched.py"
    if n == 1:
        return losses_of(run_script(*args).stderr)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", COSMOS_TEST_FSDP="1" if fsdp else "0",
               **(env or {}))
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                             str(n), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                             "--main_process_port", str(port or free_port()), *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, env=env, timeout=timeout)
    (Path(out) / "launch.log").write_text(result.stderr)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (f"sharded across {n} processes (FSDP2)" in result.stderr) == fsdp
    return losses_of(result.stderr)


def shards(out, iteration, prefix):
    return ckpt.read_shards(ckpt.shards_dir(ckpt.checkpoint_dir(out, "posttraining", "text2image", "t"), iteration),
                            prefix)


def assert_close_dicts(a, b, tol=1e-5):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=tol, atol=tol, msg=k)


def test_fsdp_equals_one_process_and_resumes_on_other_counts(tiny_bundle, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    a = run(1, tiny_bundle, one, "--max_iter", "3", "--save_iter", "3")
    b = run(2, tiny_bundle, two, "--max_iter", "3", "--save_iter", "3")
    assert a.keys() == b.keys() == {1, 2, 3} and all(abs(a[i] - b[i]) < 1e-5 * abs(a[i]) for i in a), (a, b)
    # what each process wrote is its own shards; read back whole they are the same state
    written = list(ckpt.shards_dir(ckpt.checkpoint_dir(two, "posttraining", "text2image", "t"), 3).glob("*.distcp"))
    assert len({f.name.split("_")[2] for f in written}) == 2  # __<rank>_<n>.distcp from both processes
    for prefix in ("model", "optim", "ema"):
        assert_close_dicts(shards(one, 3, prefix), shards(two, 3, prefix))
    # the consolidated NVIDIA-layout model file, built from shards, loads in one process
    fa = torch.load(ckpt.model_file(ckpt.checkpoint_dir(one, "posttraining", "text2image", "t"), 3), weights_only=True)
    fb = torch.load(ckpt.model_file(ckpt.checkpoint_dir(two, "posttraining", "text2image", "t"), 3), weights_only=True)
    assert_close_dicts(fa, fb)
    assert fb["net.blocks.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    model = load_dit(str(two / "posttraining/text2image/t"), load_ema=True, dtype=torch.float32)
    assert model.transformer_blocks[0].attn1.to_q.weight.shape == (32, 32)

    # 2 -> 1 and 1 -> 3 processes: the next two steps equal a straight 1-process run's
    straight = tmp_path / "straight"
    c = run(1, tiny_bundle, straight, "--max_iter", "5", "--save_iter", "5")
    d = run(1, tiny_bundle, two, "--max_iter", "5", "--save_iter", "5")
    assert [c[4], c[5]] == pytest.approx([d[4], d[5]], rel=1e-5)
    # 1 -> 3: three processes of batch 1 resume the 1-process checkpoint like one process of batch 3
    import shutil
    three, single = tmp_path / "three", tmp_path / "single"
    shutil.copytree(one, three)
    shutil.copytree(one, single)
    e = run(3, tiny_bundle, three, "--max_iter", "5", "--save_iter", "5", "--batch_size", "1")
    f = run(1, tiny_bundle, single, "--max_iter", "5", "--save_iter", "5", "--batch_size", "3")
    assert set(e) == set(f) == {4, 5} and [e[4], e[5]] == pytest.approx([f[4], f[5]], rel=1e-5)
    for prefix in ("model", "optim", "ema"):
        assert_close_dicts(shards(three, 5, prefix), shards(single, 5, prefix))


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_run_with_loader_workers_and_a_background_save_ends_by_itself(tiny_bundle, tmp_path, fsdp):
    """Loader worker processes (which ignore SIGTERM) and a background save mid-run: both processes finish, save and
    exit on their own. Each hung before: DCP's background collectives shared plain data parallel's gloo group
    (deadlock at the save), and the exit handlers waited for the workers forever (after the last save).
    With a launcher grace period shorter than a save, the run says so once; the finished run records exit code 0.
    Validation prompts are embedded by the main process alone (one T5 load) and sampled by both."""
    loads = tmp_path / "t5_loads.txt"
    losses = run(2, tiny_bundle, tmp_path, "--max_iter", "6", "--save_iter", "3", "--num_workers", "2",
                 "--validation_prompts", "a red circle", "--validation_iter", "3", "--validation_steps", "2",
                 "--text_encoder", tiny_bundle / "models" / "text_encoder", fsdp=fsdp, timeout=300,
                 env={"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "0", "COSMOS_TEST_T5_LOADS": str(loads)})
    assert set(losses) == set(range(1, 7))
    assert len(loads.read_text().split()) == 1
    run_ckpts = ckpt.checkpoint_dir(tmp_path, "posttraining", "text2image", "t")
    assert sorted(p.name for p in (run_ckpts.parent / "validation").iterdir()) == [
        "iter_000000003_0.jpg", "iter_000000006_0.jpg"]
    assert ckpt.model_file(run_ckpts, 3).is_file() and ckpt.model_file(run_ckpts, 6).is_file()
    assert (run_ckpts / ckpt.LATEST).read_text().strip() == ckpt.iter_name(6)
    assert (run_ckpts.parent / EXIT_CODE_FILE).read_text().strip() == "0"
    log = (tmp_path / "launch.log").read_text()
    assert log.count("the launcher (torchrun) kills its trainers 0 s after it forwards a stop signal") == 1, log[-3000:]


def test_processes_wait_for_one_another_longer_than_the_collective_timeout(tiny_bundle, tmp_path):
    """Where one process works alone for long, the others wait with a long timeout, not in a default-group
    collective, which gives up after its timeout (10 minutes for NCCL; 10 s here) and takes the run down: the main
    process writing the last model file (20 s here), one process's share of the latent cache (20 s). The cache is
    complete: every process fills its share of the one list of missing entries the main process found."""
    data = tmp_path / "dataset"
    shutil.copytree(tiny_bundle / "dataset", data)
    args = ["--max_iter", "2", "--save_iter", "2", "--cache_latents", "--dataset_dir", data]
    run(2, tiny_bundle, tmp_path, *args, fsdp=False, timeout=300,
        env={"COSMOS_TEST_PG_TIMEOUT": "10", "COSMOS_TEST_SLOW_MODEL_FILE": "20", "COSMOS_TEST_SLOW_CACHE": "1:20"})
    run_ckpts = ckpt.checkpoint_dir(tmp_path, "posttraining", "text2image", "t")
    assert ckpt.latest_iteration(run_ckpts) == 2 and run_folder.checkpoint_problem(run_ckpts, 2) is None
    assert (run_ckpts.parent / EXIT_CODE_FILE).read_text().strip() == "0"
    cached = list((data / "latents_cache").rglob("*.safetensors"))
    assert len(cached) == len(list((data / "images").iterdir()))


def test_multi_node_config_two_launches_equal_one(tiny_bundle, tmp_path):
    """accelerate_configs/multi_node_fsdp.yaml as two 'machines' of 2 processes (machine_rank 0 and 1, rendezvous
    on 127.0.0.1) gives the losses and model file of one 4-process launch."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", COSMOS_TEST_FSDP="1")

    def command(config, out, port, *machine):
        args = tiny_args(tiny_bundle, out, "--lr", "1e-4", "--max_iter", "2", "--batch_size", "1")
        args[0] = "tests/run_patched.py"
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" /
                config), "--num_processes", "4", "--main_process_port", str(port), "--mixed_precision", "no", *machine,
                *map(str, args)]

    port = free_port()  # one rendezvous for both machines
    machines = [subprocess.Popen(command("multi_node_fsdp.yaml", tmp_path / "two", port, "--num_machines", "2",
                                         "--machine_rank", str(m), "--main_process_ip", "127.0.0.1"),
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for m in (0, 1)]
    outputs = [m.communicate(timeout=600) for m in machines]
    assert all(m.returncode == 0 for m in machines), outputs[0][1][-3000:] + outputs[1][1][-3000:]
    single = subprocess.run(command("fsdp_2b.yaml", tmp_path / "one", free_port()), cwd=ROOT, env=env, capture_output=True,
                            text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = losses_of(outputs[0][1]), losses_of(single.stderr)
    assert a.keys() == b.keys() == {1, 2} and all(abs(a[i] - b[i]) <= 1e-6 * abs(b[i]) for i in a), (a, b)
    assert "sharded across 4 processes" in outputs[0][1]
    fa, fb = (torch.load(ckpt.model_file(ckpt.checkpoint_dir(tmp_path / o, "posttraining", "text2image", "t"), 2),
                         weights_only=True) for o in ("two", "one"))
    assert_close_dicts(fa, fb, tol=0)


def test_fsdp_lora_with_gradient_checkpointing(tiny_bundle, tmp_path):
    """LoRA under FSDP with --gradient_checkpointing (Accelerate's per-block checkpointing) equals one process with
    diffusers' checkpointing, and its files carry the plain module names."""
    a = run(1, tiny_bundle, tmp_path / "one", "--max_iter", "2", "--train_architecture", "lora",
            "--gradient_checkpointing", "--lr", "1e-2")
    b = run(2, tiny_bundle, tmp_path / "two", "--max_iter", "2", "--train_architecture", "lora",
            "--gradient_checkpointing", "--lr", "1e-2")
    assert a.keys() == b.keys() and all(abs(a[i] - b[i]) < 1e-5 * abs(a[i]) for i in a), (a, b)
    fa, fb = (torch.load(ckpt.model_file(ckpt.checkpoint_dir(tmp_path / o, "posttraining", "text2image", "t"), 2),
                         weights_only=True) for o in ("one", "two"))
    assert "net.blocks.0.self_attn.q_proj.lora_A.weight" in fb and fa["lora_metadata"] == fb["lora_metadata"]
    fa.pop("lora_metadata"), fb.pop("lora_metadata")
    # lora_A gets near-zero gradients in its first steps (B starts at 0), where Adam's g / (sqrt(v) + eps) magnifies
    # the last bits of a different reduction order: equal to a few 1e-4
    assert_close_dicts(fa, fb, tol=5e-4)


def _sharded_gradients_worker(rank, world, port, out):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from cosmos_t2i.distributed import clip_grad_norm_, end_grad_scale, step_adamw_on_local_shards

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # one mesh object per parameter, all equal, as Accelerate shards each block with its own
    meshes = [init_device_mesh("cpu", (world,)) for _ in _gradients()]
    params = []
    for full, mesh in zip(_gradients(), meshes):  # uneven shards included: 5 rows over 2 processes
        p = torch.nn.Parameter(distribute_tensor(torch.zeros_like(full), mesh, [Shard(0)]))
        p.grad = distribute_tensor(full, mesh, [Shard(0)])
        params.append(p)
    norm = clip_grad_norm_(params, 1.0)  # zeroes the NaN and Inf entries first
    grads = [p.grad.full_tensor() for p in params]
    # the same gradients again, the clipping factor handed to fused AdamW's step on the shards
    for p, full in zip(params, _gradients()):
        p.grad = distribute_tensor(full, p.device_mesh, [Shard(0)])
    optimizer = torch.optim.AdamW(params, lr=0.1, fused=True)
    fused_norm = clip_grad_norm_(params, 1.0, optimizer)
    assert not step_adamw_on_local_shards(optimizer)  # no state yet: torch's step creates it
    optimizer.step()
    end_grad_scale(optimizer)
    stepped = [p.full_tensor() for p in params]
    # a second step on the local shards, clipping factor included, and a third unclipped
    for scale in (2.0, 0.1):
        for p, full in zip(params, _gradients()):
            p.grad = distribute_tensor(torch.nan_to_num(full, nan=0.0, posinf=0.0, neginf=0.0) * scale,
                                       p.device_mesh, [Shard(0)])
        clip_grad_norm_(params, 1.0, optimizer)
        assert step_adamw_on_local_shards(optimizer)
        end_grad_scale(optimizer)
    state = [{k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in optimizer.state[p].items()}
             for p in params]
    stepped3 = [p.full_tensor() for p in params]
    if rank == 0:
        torch.save({"norm": norm, "grads": grads, "fused_norm": fused_norm, "stepped": stepped,
                    "stepped3": stepped3, "state3": state}, out)
    dist.barrier()
    os._exit(0)  # as cosmos_t2i.saving.end_run: gloo's teardown at exit aborts now and then (SIGABRT)


def _gradients():
    gradients = [t * 3 for t in torch.randn(40, generator=torch.Generator().manual_seed(0)).split([24, 10, 6])]
    gradients = [gradients[0].view(6, 4), gradients[1].view(5, 2), gradients[2]]
    gradients[1][2, 1] = float("nan")
    gradients[2][0] = float("inf")
    return gradients


def test_sharded_gradient_zeroing_and_clipping_equal_torch_on_full_tensors(tmp_path):
    """FSDP's gradients are clipped on local shards with one all-reduce: same norm and gradients as torch's
    clip_grad_norm_ over the full tensors (non-finite entries zeroed first, as NVIDIA); handed to fused AdamW on
    the shards instead, the clipping gives the same step as AdamW on the clipped full gradients, and so do later
    steps taken on the local shards without DTensor's dispatch."""
    import torch.multiprocessing as mp
    mp.spawn(_sharded_gradients_worker, args=(2, 29653, tmp_path / "out.pt"), nprocs=2)
    got = torch.load(tmp_path / "out.pt")
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in _gradients()]
    for p, g in zip(params, _gradients()):
        p.grad = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    assert norm > 1  # clipping happened
    torch.testing.assert_close(got["norm"], norm)
    for a, p in zip(got["grads"], params):
        torch.testing.assert_close(a, p.grad)
    torch.testing.assert_close(got["fused_norm"], norm)
    reference = torch.optim.AdamW(params, lr=0.1, foreach=True)
    reference.step()  # on the clipped gradients
    for a, p in zip(got["stepped"], params):
        torch.testing.assert_close(a, p.detach())
    # steps 2 and 3, taken on the local shards, equal torch's AdamW on the full tensors
    for scale in (2.0, 0.1):
        for p, g in zip(params, _gradients()):
            p.grad = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) * scale
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        reference.step()
    for a, p in zip(got["stepped3"], params):
        torch.testing.assert_close(a, p.detach())
    for a, p in zip(got["state3"], params):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a[key], reference.state[p][key], msg=key)


UPDATE_PLAN = [(1.0, False, False), (2.0, False, False), (2.0, True, False), (1.0, False, True), (0.1, False, False)]


def _update_gradients(step, poison):
    """Step `step`'s gradients for _gradients()'s shapes (a NaN entry where `poison`), the same on every process."""
    grads = [torch.randn(g.shape, generator=torch.Generator().manual_seed(100 * step + i)) * UPDATE_PLAN[step - 1][0]
             for i, g in enumerate(_gradients())]
    if poison:
        grads[1][4, 0] = float("nan")
    return grads


def _sharded_update_worker(rank, world, port, out, kernel):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from cosmos_t2i.ema import PowerEMA
    from cosmos_t2i.schedule import make_optimizer, make_scheduler
    from cosmos_t2i.update import finish_update, start_update

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1" if kernel else "0")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    params = [torch.nn.Parameter(distribute_tensor(torch.randn(g.shape, generator=torch.Generator().manual_seed(i)),
                                                   init_device_mesh("cpu", (world,)), [Shard(0)]))
              for i, g in enumerate(_gradients())]
    optimizer = make_optimizer(params, lr=0.1, device_type="cpu")
    ema, scheduler = PowerEMA([(str(i), p) for i, p in enumerate(params)]), make_scheduler(optimizer, "constant")
    kernel_steps = []
    for step, (_, skip, poison) in enumerate(UPDATE_PLAN, start=1):
        for p, full in zip(params, _update_gradients(step, poison)):
            p.grad = distribute_tensor(full, p.device_mesh, [Shard(0)])
        pending = start_update(params, optimizer, 1.0, skip=torch.tensor(skip), ema=ema, iteration=10 * step)
        pending.read()
        kernel_steps.append(pending.ema_done)
        if skip:
            optimizer.zero_grad(set_to_none=True)
            continue
        finish_update(pending, params, optimizer, scheduler, ema, 1.0, 10 * step)
    result = {"weights": [p.full_tensor() for p in params], "ema": [s.full_tensor() for s in ema.shadow],
              "state": [{k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in optimizer.state[p].items()}
                        for p in params], "kernel_steps": kernel_steps}
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    os._exit(0)


@pytest.mark.parametrize("kernel", [True, False])
def test_update_on_sharded_weights_equals_one_process(tmp_path, kernel):
    """start_update/finish_update on FSDP-sharded weights over 2 processes, with the one-kernel AdamW + EMA on the
    local shards (Triton's interpreter) or torch's fused AdamW on them, uneven shards: a clipped step, a skipped one,
    one with a NaN gradient, an unclipped one; weights, EMA, moments and step counts equal torch's AdamW with
    torch's clipping and PowerEMA on the full tensors."""
    import torch.multiprocessing as mp

    from cosmos_t2i.ema import PowerEMA
    mp.spawn(_sharded_update_worker, args=(2, free_port(), tmp_path / "out.pt", kernel), nprocs=2)
    got = torch.load(tmp_path / "out.pt")
    assert got["kernel_steps"] == [False] + [kernel] * 4  # torch's first step makes the state
    params = [torch.nn.Parameter(torch.randn(g.shape, generator=torch.Generator().manual_seed(i)))
              for i, g in enumerate(_gradients())]
    optimizer = torch.optim.AdamW(params, lr=0.1, betas=(0.9, 0.99), weight_decay=0.2, foreach=True)
    ema = PowerEMA([(str(i), p) for i, p in enumerate(params)])
    for step, (_, skip, poison) in enumerate(UPDATE_PLAN, start=1):
        if skip:
            continue
        for p, g in zip(params, _update_gradients(step, poison)):
            p.grad = torch.nan_to_num(g, nan=0.0)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        ema.update(10 * step)
    for a, p in zip(got["weights"], params):  # weights of order 1, moved by lr 0.1: a few float32 ulps apart
        torch.testing.assert_close(a, p.detach(), rtol=1e-6, atol=1e-6)
    for a, b in zip(got["ema"], ema.shadow):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, p in zip(got["state"], params):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(a[key], optimizer.state[p][key], rtol=1e-6, atol=1e-8)


def test_fsdp_validation_leaves_training_unchanged(tiny_bundle, tmp_path):
    """Sampling validation images (EMA weights, no backward) between steps changes nothing in training: FSDP does
    not re-gather weights it still holds gathered after a forward without backward (its root module's, and every
    block's without reshard_after_forward), so they must be released after sampling or the next step computes with
    the EMA weights. With reshard_after_forward false (fsdp_2b.yaml) and true (fsdp_14b.yaml)."""
    args = ["--max_iter", "3", "--save_iter", "100", "--lr", "1e-2"]
    sampling = ["--validation_prompts", "a red circle", "--validation_iter", "1", "--validation_steps", "2",
                "--text_encoder", tiny_bundle / "models" / "text_encoder"]
    losses = {"plain": run(2, tiny_bundle, tmp_path / "plain", *args)}
    for reshard in ("false", "true"):
        losses[reshard] = run(2, tiny_bundle, tmp_path / reshard, *args, *sampling,
                              env={"FSDP_RESHARD_AFTER_FORWARD": reshard})
    plain = losses["plain"]
    plain_file = torch.load(ckpt.model_file(ckpt.checkpoint_dir(tmp_path / "plain", "posttraining", "text2image", "t"),
                                            3), weights_only=True)
    for reshard in ("false", "true"):
        assert losses[reshard].keys() == plain.keys() == {1, 2, 3}
        assert all(abs(plain[i] - losses[reshard][i]) <= 1e-6 * abs(plain[i]) for i in plain), (reshard, losses)
        sampled_file = torch.load(ckpt.model_file(ckpt.checkpoint_dir(tmp_path / reshard, "posttraining", "text2image",
                                                                      "t"), 3), weights_only=True)
        assert_close_dicts(plain_file, sampled_file, tol=1e-6)


def _staging_worker(rank, world, port, folder):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from cosmos_t2i.distributed import host_copy_target, local_parts

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    full = _staging_tensors()
    shard = {k: distribute_tensor(v.clone(), mesh, [Shard(0)]) for k, v in full.items() if k != "bias"}
    # as Checkpointer._state: FSDP's DTensor shards, the optimizer's scalar step, and a plain tensor (one process)
    state = {"model": {"w": shard["w"], "v": shard["v"]}, "optim": {"w": {"step": torch.tensor(3.0),
             "exp_avg": shard["m"]}}, "ema": {"w": shard["e"]}, "plain": {"bias": full["bias"].clone()}}
    target = host_copy_target(state, pin=False)
    views = [t for t in local_parts(list(ckpt.tensors_in(target))) if t.dim()]
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in views)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "no overlap"
    assert spans[-1][1] - spans[0][0] <= 4096 * len(views), "one allocation, each view rounded up to a page at most"
    assert all(t.data_ptr() % 4096 == 0 for t in views)
    # a storage of the tensor's own size: DCP's writer clones a tensor whose storage is larger before writing it
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in views)
    writer = dcp.FileSystemWriter(str(folder), cache_staged_state_dict=True)
    writer.state_dict_cache = target
    group = dist.new_group(backend="gloo")
    dcp.async_save(state, checkpoint_id=str(folder / "a"), storage_writer=writer, process_group=group).result()
    for t in local_parts(list(ckpt.tensors_in(state))):
        t.add_(1)  # the next save must carry the new values through the same buffer
    dcp.async_save(state, checkpoint_id=str(folder / "b"), storage_writer=writer, process_group=group).result()
    assert writer.state_dict_cache is target
    # the second save's values went through this buffer (not through a copy DCP made for itself)
    for staged, live in zip(local_parts(list(ckpt.tensors_in(target))), local_parts(list(ckpt.tensors_in(state)))):
        torch.testing.assert_close(staged, live)
    for name, offset in (("a", 0), ("b", 1)):
        loaded = {"model": {"w": distribute_tensor(torch.zeros_like(full["w"]), mesh, [Shard(0)]),
                            "v": distribute_tensor(torch.zeros_like(full["v"]), mesh, [Shard(0)])},
                  "optim": {"w": {"step": torch.tensor(0.0),
                                  "exp_avg": distribute_tensor(torch.zeros_like(full["m"]), mesh, [Shard(0)])}},
                  "ema": {"w": distribute_tensor(torch.zeros_like(full["e"]), mesh, [Shard(0)])},
                  "plain": {"bias": torch.zeros_like(full["bias"])}}
        dcp.load(loaded, checkpoint_id=str(folder / name), process_group=group)
        got = {"w": loaded["model"]["w"], "v": loaded["model"]["v"], "m": loaded["optim"]["w"]["exp_avg"],
               "e": loaded["ema"]["w"], "bias": loaded["plain"]["bias"]}
        for key, value in got.items():
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            torch.testing.assert_close(value, full[key] + offset, msg=f"{name}/{key}")
        assert loaded["optim"]["w"]["step"].item() == 3.0 + offset
    dist.barrier()
    os._exit(0)  # as cosmos_t2i.saving.end_run: gloo's teardown at exit aborts now and then (SIGABRT)


def _staging_tensors():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(5, 3, generator=g), "v": torch.randn(6, generator=g).to(torch.bfloat16),
            "m": torch.randn(5, 3, generator=g), "e": torch.randn(5, 3, generator=g), "bias": torch.randn(7, generator=g)}


def test_background_saves_stage_into_one_exact_host_buffer(tmp_path):
    """The staging buffer that background saves copy into (host_copy_target): every tensor a page-aligned slice of
    one allocation with a storage of its own size, DTensor shards (uneven: 5 rows over 2 processes) kept as
    DTensors; DCP saves through it twice, and each checkpoint loads back with the values of its own save."""
    import torch.multiprocessing as mp
    mp.spawn(_staging_worker, args=(2, 29659, tmp_path), nprocs=2)
    assert (tmp_path / "a" / ".metadata").exists() and (tmp_path / "b" / ".metadata").exists()


def test_a_save_that_fails_on_one_process_fails_on_every_process(tiny_bundle, tmp_path):
    """The main process alone writes the model file; when that fails (a full disk), every process must learn it at
    the same point, or their next collectives would not match. The run goes on, the next save succeeds, and the
    failure is said once."""
    out = tmp_path / "ck"
    run(2, tiny_bundle, out, "--max_iter", "6", "--save_iter", "2", timeout=300,
        env={"COSMOS_TEST_MODEL_FILE_ENOSPC": "4"})
    log = (out / "launch.log").read_text()
    assert log.count("checkpoint iter_000000004.pt not saved (OSError: [Errno 28] No space left on device)") == 1
    d = ckpt.checkpoint_dir(out, "posttraining", "text2image", "t")
    assert ckpt.latest_iteration(d) == 6 and ckpt.saved_iterations(d) == [2, 6]
