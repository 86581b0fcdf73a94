"""CUDA-graph replay of the samplers' transformer call (cosmos_t2i/cuda_graphs.py).

A CPU cannot capture a CUDA graph, so the capture is replaced by a stand-in with a graph's contract: the captured
call's output tensor is the buffer every replay writes into, and a replay reads whatever the captured inputs hold
then. What is tested is ours: when a graph is captured, reused and dropped, that inputs are copied in, that the
samplers read the shared output buffer before it is overwritten, and the fallback when a capture fails. That a real
replay gives the same latents is checked on a GPU by benchmarks/bench_infer.py (cuda_graphs_same_latents).
"""

import copy
import logging

import pytest
import torch

from cosmos_t2i import cuda_graphs, flow
from cosmos_t2i.attention import lean_processors
from cosmos_t2i.pipeline import CosmosText2Image, prepare_for_inference


@pytest.fixture(scope="module")
def base(tiny_bundle):
    from diffusers import CosmosTransformer3DModel
    return CosmosTransformer3DModel.from_pretrained(tiny_bundle / "models" / "transformer").eval()


class Captures(list):
    """The stand-in's captures. `host_state()` returns what a real graph would freeze at capture (the attention
    processors' settings): each replay asserts it unchanged, since a real replay could not follow a change."""
    host_state = staticmethod(lambda: None)


@pytest.fixture
def graphs(monkeypatch):
    """Captures counted; the stand-in graph re-runs the call into the captured output buffer at each replay."""
    captures = Captures()

    def capture(fn, inputs):
        output, frozen = fn(*inputs), captures.host_state()
        captures.append(output)

        def replay():
            assert captures.host_state() == frozen, "a replay under host state its capture did not see"
            output.copy_(fn(*inputs))
        return replay, output

    monkeypatch.setattr(cuda_graphs, "capture", capture)
    monkeypatch.setattr(cuda_graphs, "on_gpu", lambda t: True)
    return captures


def context(seed, rows=1):
    return torch.randn(rows, 512, 1024, generator=torch.Generator().manual_seed(seed))


def test_samplers_give_the_same_latents_with_one_capture(base, graphs):
    plain = prepare_for_inference(copy.deepcopy(base))  # the lean attention processor in both
    graphed = prepare_for_inference(copy.deepcopy(base), cuda_graphs=True)
    graphs.host_state = lambda: [p.context_rows for p in lean_processors(graphed)]
    assert cuda_graphs.replayed(graphed) is not None and cuda_graphs.replayed(plain) is None
    mask = torch.zeros(1, 1, 64, 64)
    x = flow.initial_noise(3, (1, 16, 1, 8, 8)) * flow.SIGMA_MAX
    cond, negative = context(0), context(1)

    def ab2(model, uncond):
        return flow.sample_ab2(flow.make_denoiser(model, cond, uncond, 4.0, mask), x, flow.karras_sigmas(6))

    for uncond in (torch.zeros_like(cond), negative):  # the zero negative's graph skips its cross-attention
        assert torch.equal(ab2(graphed, uncond), ab2(plain, uncond))
    assert len(graphs) == 2  # one capture per kind of call, every other step replayed

    # the Anima sampler without guidance hands the graph's own output buffer to the Euler update
    sigmas = flow.flow_match_sigmas(5, 3.0)
    unguided = [flow.sample_flow_euler(flow.make_velocity_denoiser(model, cond, None, 1.0, mask), x / flow.SIGMA_MAX,
                                       sigmas) for model in (graphed, plain)]
    assert torch.equal(*unguided)
    assert len(graphs) == 3


def test_a_new_shape_or_new_weights_capture_again(graphs):
    layer = torch.nn.Linear(4, 3)
    replay = cuda_graphs.GraphReplay(layer)
    calls = []

    def fn(x):
        calls.append(x.shape)
        return layer(x)

    def run(x):
        with torch.no_grad():
            return replay("tag", fn, x).clone()

    a, b = torch.randn(2, 4), torch.randn(2, 4)
    for x in (a, b, a, b):
        torch.testing.assert_close(run(x), layer(x).detach(), rtol=0, atol=0)
    assert len(graphs) == 1 and len(calls) == 5  # plain, capture, then replays (each re-runs fn in the stand-in)
    run(torch.randn(5, 4))
    assert len(graphs) == 1  # a first call with a new shape runs as usual
    run(torch.randn(5, 4))
    assert len(graphs) == 2
    c = torch.randn(5, 4)
    layer.weight = torch.nn.Parameter(torch.randn(3, 4))  # replaced weights: the old graph would read the old ones
    run(c), run(c)
    assert len(graphs) == 3
    torch.testing.assert_close(run(c), layer(c).detach(), rtol=0, atol=0)
    for _ in range(2):
        torch.testing.assert_close(replay("other tag", fn, c).clone(), layer(c).detach(), rtol=0, atol=0)
    assert len(graphs) == 4  # another tag is another graph
    with torch.inference_mode():  # tensors made in inference mode could not be written outside it: its own graph
        run(c), run(c)
    assert len(graphs) == 5
    torch.testing.assert_close(run(c), layer(c).detach(), rtol=0, atol=0)


def test_a_failed_capture_falls_back_for_good(base, monkeypatch, caplog):
    attempts = []

    def failing(fn, inputs):
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(cuda_graphs, "capture", failing)
    monkeypatch.setattr(cuda_graphs, "on_gpu", lambda t: True)
    graphed = prepare_for_inference(copy.deepcopy(base), cuda_graphs=True)
    mask, x, cond = torch.zeros(1, 1, 64, 64), torch.randn(1, 16, 1, 8, 8), context(0)
    with caplog.at_level(logging.WARNING, logger="cosmos_t2i.cuda_graphs"):
        got = flow.sample_ab2(flow.make_denoiser(graphed, cond, context(1), 4.0, mask), x, flow.karras_sigmas(5))
    want = flow.sample_ab2(flow.make_denoiser(prepare_for_inference(copy.deepcopy(base)), cond, context(1), 4.0, mask), x, flow.karras_sigmas(5))
    assert torch.equal(got, want)
    assert len(attempts) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "sampling without CUDA graphs (--no-cuda_graphs silences this): capturing the transformer call failed "
        "(operation not permitted when stream is capturing)"]


def test_pipeline_uses_graphs_only_on_a_gpu(tiny_bundle):
    pipe = CosmosText2Image.from_pretrained(dit_path=str(tiny_bundle / "models" / "transformer"),
                                            vae_path=str(tiny_bundle / "models" / "vae"), device="cpu",
                                            dtype=torch.float32)
    assert cuda_graphs.replayed(pipe.transformer) is None
