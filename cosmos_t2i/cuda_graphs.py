"""Replaying the sampler's transformer call as a CUDA graph (inference on a GPU; `--no-cuda_graphs` turns it off).

A sampling step issues hundreds of kernels, and with float8 matmuls each projection adds its own scaling kernels:
the GPU then waits for the host between them (10% of a 2B step with `--fp8` on an H200, benchmarks/profile_infer.py).
Captured once as a CUDA graph, a step is a single launch. A replay runs the very kernels of the captured call on
copies of its inputs, so the images are the same as without it (benchmarks/bench_infer.py checks the latents).
"""

import logging

import torch

logger = logging.getLogger(__name__)


def capture(fn, inputs: list) -> tuple:
    """(replay, output): fn(*inputs) captured as a CUDA graph; replay() runs it again on what `inputs` then hold and
    leaves the result in `output`."""
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph):
            output = fn(*inputs)
    except BaseException:
        torch.cuda.set_stream(stream)  # a failed capture can leave this thread on the capture's side stream
        raise
    return graph.replay, output


def on_gpu(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda


class GraphReplay:
    """Calls fn(*tensors) -> tensor through one CUDA graph at a time.

    The first call with a given key (the caller's tag, inference mode and autocast, the inputs' shapes and dtypes,
    `module`'s parameters and their storage) runs fn as usual: torch.compile's compilation and lazy initialisation
    must not happen inside a capture. The second captures the graph; from then on each call copies its inputs into
    the graph's and replays it. A new key drops the old graph and its memory. The returned tensor is the graph's
    output buffer: it holds until the next call. If a capture fails (an operation that cannot be captured), the reason is logged once and
    every later call runs fn as usual.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.seen = set()  # keys called once
        self.key = self.replay = self.inputs = self.output = None  # the graph in hand
        self.failed = False

    def __call__(self, tag, fn, *inputs: torch.Tensor) -> torch.Tensor:
        if self.failed or not on_gpu(inputs[0]):
            return fn(*inputs)
        key = (tag, torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cuda"),
               tuple((t.shape, t.dtype) for t in inputs),
               # parameters replaced (a LoRA injected, weights assigned) are new objects or new storage: a graph
               # would read the old
               tuple((id(p), p.data_ptr()) for p in self.module.parameters()))
        if key != self.key:
            if key not in self.seen:
                self.seen.add(key)
                return fn(*inputs)
            self.key = self.replay = self.inputs = self.output = None  # the old graph's memory goes back first
            static = [t.clone() for t in inputs]
            try:
                self.replay, self.output = capture(fn, static)
            except Exception as error:  # noqa: BLE001 - whatever the capture met: sample without graphs
                self.failed = True
                reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
                logger.warning("sampling without CUDA graphs (--no-cuda_graphs silences this): capturing the "
                               "transformer call failed (%s)", reason)
                return fn(*inputs)
            self.key = key
            self.inputs = static
        for mine, given in zip(self.inputs, inputs):
            mine.copy_(given)
        self.replay()
        return self.output


def replayed(transformer):
    """The transformer's GraphReplay, or None when sampling runs without graphs."""
    return getattr(transformer, "graph_replay", None)


def sample_with_cuda_graphs(transformer) -> None:
    """From now on the samplers (flow.make_denoiser, make_velocity_denoiser) replay this transformer's calls from a
    CUDA graph."""
    transformer.graph_replay = GraphReplay(transformer)
