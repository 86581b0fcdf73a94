"""Run train_text2image.py with test-only patches, chosen by environment variables (production code has no hooks):

    COSMOS_TEST_FSDP=1                 Accelerate enables FSDP only on accelerators: turn its FSDP2 on for CPU
                                       processes, with the settings of accelerate_configs/fsdp_2b.yaml
                                       (FSDP_RESHARD_AFTER_FORWARD=true: fsdp_14b.yaml's)
    COSMOS_TEST_FSDP_BF16=1            with it, FSDP computes in bf16 (mixed precision, as on GPUs)
    COSMOS_TEST_FP8_ON_CPU=1           let --fp8 run on the CPU (torch has CPU float8 matmuls; no Hopper needed)
    COSMOS_TEST_KILL_IN_MODEL_FILE=N   SIGKILL the trainer while the background save of iteration N writes
                                       the model file (half a file on disk, as a real kill leaves)
    COSMOS_TEST_MODEL_FILE_ENOSPC=N    writing the model file of iteration N fails with ENOSPC (a disk that filled up)
    COSMOS_TEST_SLOW_MODEL_FILE=S      each model file takes S seconds longer to write (a large model, a slow disk)
    COSMOS_TEST_PG_TIMEOUT=S           the default process group's collectives give up after S seconds (as NCCL's
                                       do after 10 minutes)
    COSMOS_TEST_T5_LOADS=FILE          append a line to FILE each time a process loads a T5 encoder
    COSMOS_TEST_SLOW_CACHE=RANK:S      the process of that rank waits S seconds before it scans or fills the latent
                                       cache (one share of a large dataset taking longer than the others)

    python tests/run_patched.py [train_text2image.py flags]   (or under accelerate launch / torch.distributed.run)
"""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if os.environ.get("COSMOS_TEST_FSDP") == "1":
    import accelerate
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    original_init = accelerate.Accelerator.__init__

    def fsdp_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.state.distributed_type = DistributedType.FSDP
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["CosmosTransformerBlock"],
            reshard_after_forward=os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "false").lower() == "true")
        if os.environ.get("COSMOS_TEST_FSDP_BF16") == "1":  # bf16 all-gathers, as on GPUs with mixed_precision bf16
            import torch
            from torch.distributed.fsdp import MixedPrecisionPolicy
            self.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                                 reduce_dtype=torch.float32)

    accelerate.Accelerator.__init__ = fsdp_init

if os.environ.get("COSMOS_TEST_FP8_ON_CPU") == "1":
    from cosmos_t2i import fp8

    fp8.fp8_unavailable = lambda purpose: None

if os.environ.get("COSMOS_TEST_KILL_IN_MODEL_FILE"):
    from cosmos_t2i import checkpoint

    original_write = checkpoint.write_model_file

    def write_then_die(folder, path, *args, **kwargs):
        if Path(folder).name != f"iter_{int(os.environ['COSMOS_TEST_KILL_IN_MODEL_FILE']):09d}":
            return original_write(folder, path, *args, **kwargs)
        tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")
        tmp.write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.write_model_file = write_then_die

if os.environ.get("COSMOS_TEST_MODEL_FILE_ENOSPC"):
    import errno

    from cosmos_t2i import checkpoint

    write_or_fail = checkpoint.write_model_file

    def disk_full_at(folder, path, *args, **kwargs):
        if Path(folder).name == f"iter_{int(os.environ['COSMOS_TEST_MODEL_FILE_ENOSPC']):09d}":
            Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_or_fail(folder, path, *args, **kwargs)

    checkpoint.write_model_file = disk_full_at

if os.environ.get("COSMOS_TEST_SLOW_MODEL_FILE"):
    from cosmos_t2i import checkpoint

    write_now = checkpoint.write_model_file

    def write_slowly(*args, **kwargs):
        time.sleep(float(os.environ["COSMOS_TEST_SLOW_MODEL_FILE"]))
        return write_now(*args, **kwargs)

    checkpoint.write_model_file = write_slowly

if os.environ.get("COSMOS_TEST_PG_TIMEOUT"):
    from datetime import timedelta

    import torch.distributed

    init_now = torch.distributed.init_process_group

    def init_with_short_timeout(*args, **kwargs):
        kwargs["timeout"] = timedelta(seconds=float(os.environ["COSMOS_TEST_PG_TIMEOUT"]))
        return init_now(*args, **kwargs)

    torch.distributed.init_process_group = init_with_short_timeout

if os.environ.get("COSMOS_TEST_T5_LOADS"):
    from cosmos_t2i import t5

    load_now = t5.load_text_encoder

    def load_and_count(*args, **kwargs):
        with open(os.environ["COSMOS_TEST_T5_LOADS"], "a") as f:
            f.write(f"{os.getpid()}\n")
        return load_now(*args, **kwargs)

    t5.load_text_encoder = load_and_count

if os.environ.get("COSMOS_TEST_SLOW_CACHE"):
    from cosmos_t2i.latent_cache import LatentCache

    slow_rank, slow_s = os.environ["COSMOS_TEST_SLOW_CACHE"].split(":")

    def slowly(method):
        def run(self, *args, **kwargs):
            if os.environ.get("RANK", "0") == slow_rank:
                time.sleep(float(slow_s))
            return method(self, *args, **kwargs)
        return run

    LatentCache.stale, LatentCache.fill = slowly(LatentCache.stale), slowly(LatentCache.fill)

import train_text2image  # noqa: E402

if __name__ == "__main__":
    from cosmos_t2i.cli import run_main

    run_main(lambda: train_text2image.main(sys.argv[1:]), "train_text2image.py")
