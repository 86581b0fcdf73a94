"""Anima's weight files: the original single file and the diffusers folder load to the same models, bit for bit, both
ways; sizes are read off the weights; the DiT key names agree with diffusers' own Anima conversion."""

import pytest
import torch

from cosmos_t2i import anima
from cosmos_t2i.registry import COMMON_CONFIG


def tiny_anima(blocks=3):
    """A random Anima at toy widths: a 3-block DiT (2 heads of 128: the width rule of the real models) and a
    2-block adapter from 48-wide 'Qwen' states to the DiT's 1024-wide context."""
    from diffusers import AnimaTextConditioner, CosmosTransformer3DModel

    torch.manual_seed(0)
    dit = CosmosTransformer3DModel(**{**COMMON_CONFIG, "num_attention_heads": 2, "attention_head_dim": 128,
                                      "num_layers": blocks, "adaln_lora_dim": 32})
    conditioner = AnimaTextConditioner(source_dim=48, target_dim=1024, model_dim=64, num_layers=2,
                                       num_attention_heads=4, target_vocab_size=100)
    for module in (dit, conditioner):  # diffusers zero-initialises some layers: make every tensor count
        for p in module.parameters():
            p.data.normal_(0, 0.02)
    return anima.attach_text_conditioner(dit.eval(), conditioner.eval()), conditioner


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("blocks", [3, 4])
def test_single_file_round_trip_is_bit_exact_and_sizes_come_from_the_weights(tmp_path, blocks):
    dit, conditioner = tiny_anima(blocks)
    path = tmp_path / "anima.safetensors"
    anima.save_single_file(dit, path)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert f"net.blocks.{blocks - 1}.self_attn.q_proj.weight" in keys and "net.llm_adapter.embed.weight" in keys
    assert "net.llm_adapter.blocks.1.cross_attn.k_proj.weight" in keys  # adapter keys are never renamed
    loaded_dit = anima.load_anima(path, dtype=torch.float32)
    loaded_conditioner = loaded_dit.text_conditioner
    assert loaded_dit.config.num_layers == blocks and loaded_dit.config.num_attention_heads == 2
    assert loaded_conditioner.config.num_layers == 2 and loaded_conditioner.config.source_dim == 48
    assert_same_state(loaded_dit, dit)
    assert_same_state(loaded_conditioner, conditioner)
    # and back: the same file, key for key and bit for bit
    again = tmp_path / "again.safetensors"
    anima.save_single_file(loaded_dit, again)
    assert again.read_bytes() == path.read_bytes()


def test_comfyui_prefix_and_diffusers_folder_load_the_same_models(tmp_path):
    dit, conditioner = tiny_anima()
    state = anima.single_file_state(dit_only(dit), conditioner.state_dict(), prefix="model.diffusion_model.")
    torch.save(state, tmp_path / "comfy.pt")
    a_dit = anima.load_anima(tmp_path / "comfy.pt", dtype=torch.float32)
    a_cond = a_dit.text_conditioner
    folder_dit = type(dit)(**dit.config)
    folder_dit.load_state_dict(dit_only(dit))
    folder_dit.save_pretrained(tmp_path / "folder" / "transformer")
    conditioner.save_pretrained(tmp_path / "folder" / "text_conditioner")
    b_dit = anima.load_anima(tmp_path / "folder", dtype=torch.float32)
    b_cond = b_dit.text_conditioner
    for x, y in ((a_dit, b_dit), (a_cond, b_cond), (a_dit, dit), (a_cond, conditioner)):
        assert_same_state(x, y)
    # the loaded pair runs: adapter output is the DiT's context, computed by the DiT's forward from the text inputs
    ids, qwen = torch.randint(0, 100, (1, 7)), torch.randn(1, 5, 48)
    context = a_cond(qwen, ids, torch.ones(1, 7), torch.ones(1, 5))
    assert context.shape == (1, 512, 1024)
    x, t, mask = torch.randn(1, 16, 1, 8, 8), torch.tensor([0.5]), torch.zeros(1, 1, 64, 64)
    out = a_dit(x, t, context, padding_mask=mask, return_dict=False)[0]
    assert out.shape == (1, 16, 1, 8, 8) and torch.isfinite(out).all()
    inputs = anima.text_inputs(qwen, torch.ones(1, 5), ids, torch.ones(1, 7))
    assert torch.equal(a_dit(x, t, inputs, padding_mask=mask, return_dict=False)[0], out)


def dit_only(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("text_conditioner.")}


def test_dit_key_names_agree_with_diffusers_anima_conversion():
    """diffusers' AnimaLoraLoaderMixin renames the original files' module names to its own: every Linear of the DiT
    must get the name our mapping gives it, and the adapter's names must pass through unchanged."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_anima_lora_to_diffusers

    dit, conditioner = tiny_anima()
    state = anima.single_file_state(dit_only(dit), conditioner.state_dict(), prefix="")
    linears = [k.removesuffix(".weight") for k, v in state.items() if k.endswith(".weight") and v.dim() == 2
               and not k.startswith(anima.ADAPTER) and "embed" not in k.split(".")[-2]]
    converted = _convert_non_diffusers_anima_lora_to_diffusers(
        {f"diffusion_model.{k}.lora_A.weight": 0 for k in linears} | {"diffusion_model.llm_adapter.out_proj.lora_A.weight": 0})
    ours = {f"transformer.{anima.nvidia_to_diffusers_key(k + '.weight').removesuffix('.weight')}.lora_A.weight"
            for k in linears}
    assert len(linears) > 20 and ours | {"text_conditioner.out_proj.lora_A.weight"} == set(converted)


def test_a_predict2_file_is_not_taken_for_anima(tmp_path):
    dit, _ = tiny_anima()
    torch.save({"net." + anima.diffusers_to_nvidia_key(k): v for k, v in dit_only(dit).items()}, tmp_path / "p.pt")
    with pytest.raises(ValueError, match="not an Anima file"):
        anima.load_anima(tmp_path / "p.pt")
