"""Anima LoRAs in every format the community loads, both ways, on a tiny random Anima (CPU, fp32).

Exports are loaded back through the reference's own loading code where it is installed (diffusers' AnimaModularPipeline
.load_lora_weights, which also reads ComfyUI keys through its Anima converter), and through short restatements of
ComfyUI's and sd-scripts' rules where it is not (ComfyUI: comfy/lora.py model_lora_keys_unet and load_lora,
comfy/weight_adapter/lora.py; sd-scripts: networks/lora_anima.py; see docs/anima.md "LoRA formats"). Files made in each
tool's form, built here from a known adapter without our writers, must give the model output of merging that adapter.
"""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from cosmos_t2i import anima
from cosmos_t2i.families import ANIMA
from cosmos_t2i.lora import add_lora, load_adapter_into_peft_, read_lora
from cosmos_t2i.lora_formats import (kohya_name, lora_entry, nvidia_of_kohya, save_diffusers_adapter, to_comfyui,
                                     to_kohya)
from cosmos_t2i.models import load_dit
from cosmos_t2i.weight_files import diffusers_to_nvidia_key

# modules of the known adapter: DiT attention, MLP, modulation and top level, and the text adapter's
MODULES = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.1.attn2.to_v", "transformer_blocks.0.ff.net.2",
           "transformer_blocks.1.norm1.linear_1", "proj_out", "text_conditioner.blocks.0.self_attn.q_proj",
           "text_conditioner.blocks.1.cross_attn.o_proj", "text_conditioner.blocks.1.mlp.0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random Anima diffusers folder (transformer/ and text_conditioner/), every weight non-zero."""
    folder = tmp_path_factory.mktemp("anima_base")
    torch.manual_seed(0)
    model = anima.new_anima("tiny")
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    conditioner = model._modules.pop("text_conditioner")
    model.save_pretrained(folder / "transformer")
    conditioner.save_pretrained(folder / "text_conditioner")
    return folder


def known_adapter(modules=MODULES, ranks=(2, 4), alphas=(8.0, 3.0), seed=1) -> dict:
    """Random LoRA pairs on `modules`, ranks and alphas alternating (alpha != rank everywhere)."""
    g = torch.Generator().manual_seed(seed)
    linears = {n: m for n, m in anima.new_anima("tiny", device="meta").named_modules()}
    out = {}
    for i, name in enumerate(modules):
        rank = ranks[i % len(ranks)]
        out[name] = {"A": torch.randn(rank, linears[name].in_features, generator=g) * 0.3,
                     "B": torch.randn(linears[name].out_features, rank, generator=g) * 0.3,
                     "alpha": alphas[i % len(alphas)]}
    return out


INPUTS = dict(hidden_states=torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(2)),
              timestep=torch.tensor([0.5]), padding_mask=torch.zeros(1, 1, 64, 64))
TEXT = anima.text_inputs(torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(3)), torch.ones(1, 5),
                         torch.randint(3, 60, (1, 7), generator=torch.Generator().manual_seed(4)), torch.ones(1, 7))


@torch.no_grad()
def output(model) -> torch.Tensor:
    """Our DiT (its adapter attached) on fixed latents and text."""
    return model(encoder_hidden_states=TEXT, return_dict=False, **INPUTS)[0]


@torch.no_grad()
def reference_output(pipe) -> torch.Tensor:
    """The same through diffusers' pipeline components (adapter run first, as the pipeline does)."""
    return pipe.transformer(encoder_hidden_states=pipe.text_conditioner(**TEXT), return_dict=False, **INPUTS)[0]


@torch.no_grad()
def expected(base, adapter, full=None) -> torch.Tensor:
    """The base with `full` tensors put in and W + alpha / rank * B @ A added, written out here."""
    model = anima.load_anima(base, dtype=torch.float32)
    model.load_state_dict(full or {}, strict=False)
    modules = dict(model.named_modules())
    for name, e in adapter.items():
        modules[name].weight += e["alpha"] / e["A"].shape[0] * e["B"] @ e["A"]
    return output(model)


def reference_pipeline(base, text_conditioner=None):
    """diffusers' AnimaModularPipeline holding the base's transformer and text adapter (what load_lora_weights
    needs; nothing else is run)."""
    from diffusers import AnimaTextConditioner, CosmosTransformer3DModel
    from diffusers.modular_pipelines import AnimaAutoBlocks

    pipe = AnimaAutoBlocks().init_pipeline()
    pipe.update_components(transformer=CosmosTransformer3DModel.from_pretrained(base / "transformer").eval(),
                           text_conditioner=AnimaTextConditioner.from_pretrained(
                               text_conditioner or base / "text_conditioner").eval())
    return pipe


def close(a, b) -> bool:
    return (a - b).abs().max().item() < 1e-5


# ---------------------------------------------------------------- key names
def test_kohya_names_follow_sd_scripts_rule_and_read_back_for_every_linear():
    """sd-scripts (networks/lora_anima.py create_modules): lora_name = "lora_unet_" + module path, dots replaced by
    underscores. Every Linear of the DiT and its adapter (NVIDIA names) reads back to itself."""
    model = anima.new_anima("tiny", device="meta")
    linears = [diffusers_to_nvidia_key(n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 60 and "llm_adapter.blocks.1.mlp.2" in linears and "t_embedder.1.linear_2" in linears
    for name in linears:
        assert kohya_name(name) == "lora_unet_" + name.replace(".", "_")
        assert nvidia_of_kohya(kohya_name(name), "f") == name
    with pytest.raises(ValueError, match="lora_unet_blocks_0_self_attn_q_norm names no Linear"):
        nvidia_of_kohya("lora_unet_blocks_0_self_attn_q_norm", "f")


@pytest.mark.parametrize("key", ["llm_adapter.blocks.0.self_attn.q_proj.lora_A.weight",
                                 "diffusion_model.llm_adapter.blocks.0.self_attn.q_proj.lora_A.weight",
                                 "model.diffusion_model.llm_adapter.blocks.0.self_attn.q_proj.lora_A.weight",
                                 "text_conditioner.blocks.0.self_attn.q_proj.lora_A.weight",
                                 "llm_adapter.blocks.0.self_attn.q_proj.lora_A.default.weight",
                                 "lora_unet_llm_adapter_blocks_0_self_attn_q_proj.lora_down.weight"])
def test_adapter_lora_keys_of_every_layout_name_the_text_conditioner_module(key):
    """The text adapter's names pass through untouched (ComfyUI's model.diffusion_model. prefix was not stripped, so
    the DiT renames turned blocks.0.self_attn.q_proj inside it into transformer_blocks.0.attn1.to_q)."""
    assert lora_entry(key, "f") == ("text_conditioner.blocks.0.self_attn.q_proj", "A")
    assert lora_entry(key.replace("llm_adapter.", "").replace("llm_adapter_", "").replace(
        "text_conditioner.", ""), "f") == ("transformer_blocks.0.attn1.to_q", "A")
    with pytest.raises(ValueError, match="adapts the text encoder"):
        lora_entry("lora_te_layers_0_self_attn_q_proj.lora_down.weight", "f")


# ---------------------------------------------------------------- exports, loaded by the reference
def test_diffusers_export_loads_in_anima_pipeline_with_its_alphas(base, tmp_path):
    """transformer.* and text_conditioner.* pairs, alpha and rank per module in the metadata (the loader refuses
    .alpha entries): AnimaModularPipeline.load_lora_weights gives the merged adapter's output, as does ours."""
    adapter = known_adapter()
    file = save_diffusers_adapter(adapter, tmp_path / "dif", exact_targets=True)
    keys = set(load_file(file))
    assert keys == {f"{'' if m.startswith('text_') else 'transformer.'}{m}.lora_{p}.weight" for m in MODULES
                    for p in "AB"}
    pipe = reference_pipeline(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(tmp_path / "dif"))
    assert not [w for w in caught if "inconsistency" in str(w.message)]  # PEFT injected the file's modules only
    want = expected(base, adapter)
    assert (want - expected(base, {})).abs().max() > 0.1  # the LoRA matters
    assert close(reference_output(pipe), want)
    assert close(output(load_dit(str(base), lora_path=str(tmp_path / "dif"), family=ANIMA, dtype=torch.float32)),
                 want)


def comfyui_merge(base, lora: dict) -> torch.Tensor:
    """ComfyUI's rule restated: every model tensor `diffusion_model.<key>` is addressed as `diffusion_model.<key
    without .weight>` or `lora_unet_<that with underscores>` (a non-.weight tensor by its own name); a pair
    (lora_B/lora_up, lora_A/lora_down) adds alpha / rank * B @ A (1 without .alpha); <x>.set_weight replaces it.
    Every entry of the file must be used."""
    state = anima.single_file_state(*split(base), prefix="diffusion_model.")  # ComfyUI's Anima: the original keys
    key_map = {}
    for k in state:
        if k.endswith(".weight"):
            x = k.removesuffix(".weight")
            key_map[x] = key_map["lora_unet_" + x.removeprefix("diffusion_model.").replace(".", "_")] = k
        else:
            key_map[k] = k
    used = set()
    for x, target in key_map.items():
        for up, down in (("lora_B.weight", "lora_A.weight"), ("lora_up.weight", "lora_down.weight")):
            if f"{x}.{up}" in lora:
                b, a, alpha = lora[f"{x}.{up}"], lora[f"{x}.{down}"], lora.get(f"{x}.alpha")
                state[target] = state[target] + (float(alpha) / a.shape[0] if alpha is not None else 1.0) * b @ a
                used |= {f"{x}.{up}", f"{x}.{down}", f"{x}.alpha"}
        if f"{x}.set_weight" in lora:
            state[target] = lora[f"{x}.set_weight"]
            used.add(f"{x}.set_weight")
    assert set(lora) <= used, sorted(set(lora) - used)[:3]
    return output(anima._from_single_file(state, "comfy", torch.float32))  # split at diffusion_model.llm_adapter.


def split(base):
    model = anima.load_anima(base, dtype=torch.float32)
    adapter = model._modules.pop("text_conditioner")
    return model.state_dict(), adapter.state_dict()


def test_comfyui_export_loads_by_comfyui_rule_and_in_diffusers(base, tmp_path):
    """diffusion_model.<NVIDIA module>.lora_A/B.weight (the adapter's as diffusion_model.llm_adapter.*), alpha / rank
    folded into B and no .alpha entries (diffusion-pipe's layout): ComfyUI's rule and diffusers' Anima converter both
    give the merged output, and our reader reads it back."""
    adapter = known_adapter()
    lora = to_comfyui(adapter, alpha_entries=False)
    assert set(lora) == {f"diffusion_model.{diffusers_to_nvidia_key(m)}.lora_{p}.weight" for m in MODULES for p in "AB"}
    assert "diffusion_model.llm_adapter.blocks.1.cross_attn.o_proj.lora_B.weight" in lora
    want = expected(base, adapter)
    assert close(comfyui_merge(base, lora), want)
    save_file(lora, str(tmp_path / "comfy.safetensors"))
    pipe = reference_pipeline(base)
    pipe.load_lora_weights(str(tmp_path / "comfy.safetensors"))
    assert close(reference_output(pipe), want)
    ours = load_dit(str(base), lora_path=str(tmp_path / "comfy.safetensors"), family=ANIMA, dtype=torch.float32)
    assert close(output(ours), want)


def test_kohya_export_has_sd_scripts_names_and_alphas(base, tmp_path):
    """lora_unet_<NVIDIA module with underscores>.lora_down/lora_up.weight and .alpha, alpha kept as trained: the
    sd-scripts merge (W + up @ down * alpha / dim) as ComfyUI applies it, and our reader, give the merged output."""
    adapter = known_adapter()
    lora = to_kohya(adapter)
    names = {"lora_unet_" + diffusers_to_nvidia_key(m).replace(".", "_") for m in MODULES}
    assert set(lora) == {f"{n}.{p}" for n in names for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert float(lora["lora_unet_llm_adapter_blocks_1_mlp_0.alpha"]) == 3.0
    assert lora["lora_unet_blocks_0_self_attn_q_proj.alpha"].dtype == torch.float32
    want = expected(base, adapter)
    assert close(comfyui_merge(base, lora), want)
    save_file(lora, str(tmp_path / "kohya.safetensors"))
    back, _ = read_lora(tmp_path / "kohya.safetensors")
    assert {m: e["alpha"] for m, e in back.items()} == {m: e["alpha"] for m, e in adapter.items()}
    ours = load_dit(str(base), lora_path=str(tmp_path / "kohya.safetensors"), family=ANIMA, dtype=torch.float32)
    assert close(output(ours), want)


# ---------------------------------------------------------------- the tools' files, read by us
def tool_files(adapter, folder) -> dict:
    """The known adapter in each tool's form, written here key by key (not by our writers)."""
    nv = {m: diffusers_to_nvidia_key(m) for m in adapter}
    kohya = {}
    for m, e in adapter.items():
        name = "lora_unet_" + nv[m].replace(".", "_")
        kohya |= {f"{name}.lora_down.weight": e["A"], f"{name}.lora_up.weight": e["B"],
                  f"{name}.alpha": torch.tensor(e["alpha"])}
    save_file(kohya, str(folder / "kohya.safetensors"))
    # diffusion-pipe: PEFT state with ComfyUI's prefix, alpha forced to rank (so B carries the scale), PEFT's config
    # beside in the model's (NVIDIA) names; the rank-2 modules in its patterns
    (folder / "pipe").mkdir()
    save_file({f"diffusion_model.{nv[m]}.lora_{p}.weight": (e["A"] if p == "A" else e["B"] * e["alpha"] / e["A"].shape[
        0]) for m, e in adapter.items() for p in "AB"}, str(folder / "pipe" / "adapter_model.safetensors"))
    twos = {f"^{nv[m]}$": 2 for m, e in adapter.items() if e["A"].shape[0] == 2}
    (folder / "pipe" / "adapter_config.json").write_text(json.dumps(
        {"r": 4, "lora_alpha": 4, "rank_pattern": twos, "alpha_pattern": twos, "peft_type": "LORA"}))
    # diffusers: per component, the commonest rank/alpha plus PEFT's patterns
    tensors, meta = {}, {}
    for m, e in adapter.items():
        component, rel = ("text_conditioner", m[17:]) if m.startswith("text_conditioner.") else ("transformer", m)
        tensors |= {f"{component}.{rel}.lora_A.weight": e["A"], f"{component}.{rel}.lora_B.weight": e["B"]}
        meta.setdefault(f"{component}.r", 4)
        meta.setdefault(f"{component}.lora_alpha", 8.0)
        meta.setdefault(f"{component}.target_modules", []).append(rel)
        meta.setdefault(f"{component}.rank_pattern", {})[rel] = e["A"].shape[0]
        meta.setdefault(f"{component}.alpha_pattern", {})[rel] = e["alpha"]
    save_file(tensors, str(folder / "dif.safetensors"), {"lora_adapter_metadata": json.dumps(meta)})
    return {"kohya": folder / "kohya.safetensors", "diffusion-pipe": folder / "pipe",
            "diffusers": folder / "dif.safetensors"}


def test_files_of_each_tool_apply_as_the_adapter_with_lora_path_and_dit_path(base, tmp_path):
    adapter = known_adapter()
    want = expected(base, adapter)
    for tool, path in tool_files(adapter, tmp_path).items():
        merged = load_dit(str(base), lora_path=str(path), family=ANIMA, dtype=torch.float32)
        assert close(output(merged), want), tool
        as_dit = load_dit(str(path), base_dit_path=str(base), family=ANIMA, dtype=torch.float32)  # --dit_path LORA
        assert close(output(as_dit), want), tool
        with pytest.raises(ValueError, match="without a recorded base: pass --base_dit_path"):
            load_dit(str(path), family=ANIMA)


# ---------------------------------------------------------------- a text adapter trained in full
def our_lora_file(path, base, adapter, full) -> None:
    """A LoRA run's model file as the trainer writes it: net.<NVIDIA module>.lora_A/B.weight, the adapter trained in
    full as net.llm_adapter.*, one rank and alpha in lora_metadata."""
    state = {f"net.{diffusers_to_nvidia_key(m)}.lora_{p}.weight": e[p] for m, e in adapter.items() for p in "AB"}
    state |= {"net." + diffusers_to_nvidia_key(k): v for k, v in full.items()}
    state["lora_metadata"] = {"rank": 4, "alpha": 8.0, "family": "anima", "base_path": str(base), "model_size": "tiny"}
    torch.save(state, path)


def test_text_adapter_trained_in_full_travels_with_each_export(base, tmp_path, capsys):
    from cosmos_t2i import export

    dit_modules = [m for m in MODULES if not m.startswith("text_")]
    adapter = known_adapter(dit_modules, ranks=(4,), alphas=(8.0,))
    g = torch.Generator().manual_seed(5)
    trained = {"text_conditioner." + k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in split(base)[1].items()}
    want = expected(base, adapter, trained)
    assert (want - expected(base, adapter)).abs().max() > 1e-3  # the trained adapter matters
    our_lora_file(tmp_path / "lora.pt", base, adapter, trained)
    assert close(output(load_dit(str(tmp_path / "lora.pt"), family=ANIMA, dtype=torch.float32)), want)

    export.main(["lora-diffusers", "--lora_path", str(tmp_path / "lora.pt"), "--output", str(tmp_path / "dif")])
    pipe = reference_pipeline(base, text_conditioner=tmp_path / "dif" / "text_conditioner")
    pipe.load_lora_weights(str(tmp_path / "dif"))
    assert close(reference_output(pipe), want)
    assert "pipe.load_lora_weights" in (tmp_path / "dif" / "README.md").read_text()
    assert close(output(load_dit(str(base), lora_path=str(tmp_path / "dif"), family=ANIMA, dtype=torch.float32)), want)

    export.main(["lora-comfyui", "--lora_path", str(tmp_path / "lora.pt"), "--output", str(tmp_path / "c.safetensors")])
    comfy = load_file(str(tmp_path / "c.safetensors"))
    assert {k for k in comfy if k.endswith(".set_weight")} == {
        "diffusion_model." + diffusers_to_nvidia_key(k).removesuffix(".weight") + ".set_weight" for k in trained}
    assert close(comfyui_merge(base, comfy), want)
    assert close(output(load_dit(str(base), lora_path=str(tmp_path / "c.safetensors"), family=ANIMA,
                                 dtype=torch.float32)), want)
    assert "ComfyUI applies them, diffusers and diffusion-pipe refuse them" in capsys.readouterr().out

    export.main(["lora-kohya", "--lora_path", str(tmp_path / "lora.pt"), "--output", str(tmp_path / "k.safetensors")])
    assert "kohya's LoRA format has no entry for whole tensors" in capsys.readouterr().out
    from safetensors import safe_open
    with safe_open(str(tmp_path / "k.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora_anima" and f.metadata()["ss_network_alpha"] == "8.0"
    assert close(comfyui_merge(base, load_file(str(tmp_path / "k.safetensors"))), expected(base, adapter))


# ---------------------------------------------------------------- starting a LoRA run from a file
def test_load_adapter_into_peft_layers_reproduces_the_file(base):
    """A run at rank 4, alpha 16 started from a file at alpha 3: B rescaled so the model computes the file's
    adapter; a module the run does not adapt, another rank, or a module the file lacks are one-line errors."""
    targets = ["q_proj", "mlp.layer2"]  # NVIDIA names: every block's self/cross-attention q and MLP out projection
    modules = [f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn1.to_q", "attn2.to_q", "ff.net.2")]
    adapter = known_adapter(modules, ranks=(4,), alphas=(3.0,))
    model = anima.load_anima(base, dtype=torch.float32)
    add_lora(model, rank=4, alpha=16.0, nvidia_targets=targets, seed=0)
    load_adapter_into_peft_(model, adapter, "file.safetensors")
    layer = model.transformer_blocks[0].attn1.to_q
    assert layer.lora_B["default"].weight.dtype == torch.float32
    assert close(output(model), expected(base, adapter))
    with pytest.raises(ValueError, match=r"file: .*blocks.0.self_attn.k_proj, which this run does not adapt"):
        load_adapter_into_peft_(model, known_adapter(modules + ["transformer_blocks.0.attn1.to_k"], ranks=(4,)),
                                "file")
    with pytest.raises(ValueError, match="is rank 2, this run's LoRA rank 4: pass --lora_rank 2"):
        load_adapter_into_peft_(model, known_adapter(modules, ranks=(2,)), "file")
    with pytest.raises(ValueError, match=r"file holds no LoRA for blocks.1.mlp.layer2 \(and 0 more"):
        load_adapter_into_peft_(model, known_adapter(modules[:-1], ranks=(4,)), "file")


def test_trainer_starts_a_lora_from_a_kohya_file_and_a_third_party_lora_merges_with_base_dit_path(anima_bundle,
                                                                                                  tmp_path):
    """--init_lora: a run trained here, exported to kohya's form, starts a new run that (at lr 1e-12) saves the same
    adapter (to 1e-6); a rank that does not fit is one line naming --lora_rank. A LoRA trained on --dit_path of a
    kohya file (no recorded base) with --base_dit_path loads later from its own record."""
    from conftest import anima_args, run_script

    lora_flags = ["--train_architecture", "lora", "--lora_rank", "4", "--lora_alpha", "2", "--no-ema"]
    run_script(*anima_args(anima_bundle, tmp_path / "a", *lora_flags, "--max_iter", "2", "--save_iter", "2"))
    trained, = (tmp_path / "a").rglob("model/iter_000000002.pt")
    kohya = tmp_path / "kohya.safetensors"
    run_script("-m", "cosmos_t2i.export", "lora-kohya", "--lora_path", trained, "--output", kohya)
    run_script(*anima_args(anima_bundle, tmp_path / "b", *lora_flags, "--init_lora", kohya, "--lr", "1e-12",
                           "--weight_decay", "0", "--max_iter", "1", "--save_iter", "1"))
    started, = (tmp_path / "b").rglob("model/iter_000000001.pt")
    before, after = read_lora(trained)[0], read_lora(started)[0]
    assert before.keys() == after.keys() and len(before) > 0
    for module in before:
        for part in "AB":
            torch.testing.assert_close(after[module][part].float(), before[module][part].float(), rtol=0, atol=1e-6)
    wrong = run_script(*anima_args(anima_bundle, tmp_path / "c", *lora_flags, "--lora_rank", "8", "--init_lora", kohya,
                                   "--max_iter", "1"), check=False)
    assert wrong.returncode != 0 and "--lora_rank 4" in wrong.stderr
    # a LoRA trained on top of the kohya LoRA merged into its base loads later from its own record alone
    run_script(*anima_args(anima_bundle, tmp_path / "d", *lora_flags, "--dit_path", kohya, "--base_dit_path",
                           anima_bundle / "models", "--max_iter", "1", "--save_iter", "1"))
    stacked, = (tmp_path / "d").rglob("model/iter_000000001.pt")
    loaded = load_dit(str(stacked), family=ANIMA, dtype=torch.float32).state_dict()
    by_hand = load_dit(str(kohya), base_dit_path=str(anima_bundle / "models"), lora_path=str(stacked), family=ANIMA,
                       dtype=torch.float32).state_dict()
    assert loaded.keys() == by_hand.keys() and all(torch.equal(loaded[k], by_hand[k]) for k in loaded)


def test_init_lora_with_a_fully_trained_adapter_needs_adapter_lr(base, tmp_path):
    """A file carrying the text adapter in full starts a run only if the adapter goes on training (else the run's
    LoRA files would leave it out and sample with the base's); with it, the adapter is the file's."""
    from cosmos_t2i.training import start_lora_from_file

    modules = [f"transformer_blocks.{i}.attn{j}.to_q" for i in range(2) for j in (1, 2)]  # every q_proj of the DiT
    adapter = known_adapter(modules, ranks=(4,), alphas=(8.0,))
    trained = {"text_conditioner." + k: v + 0.1 for k, v in split(base)[1].items()}
    our_lora_file(tmp_path / "lora.pt", base, adapter, trained)
    model = anima.load_anima(base, dtype=torch.float32)
    add_lora(model, rank=4, alpha=4.0, nvidia_targets=["q_proj"], seed=0)
    with pytest.raises(ValueError, match="lora.pt carries a trained text adapter: pass --adapter_lr > 0"):
        start_lora_from_file(model, tmp_path / "lora.pt", adapter_trains=False)
    start_lora_from_file(model, tmp_path / "lora.pt", adapter_trains=True)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())


def test_a_pipeline_config_without_the_adapter_component_gives_alpha_rank():
    """diffusers loads a component its metadata has no config for with alpha = rank (not PEFT's default 8)."""
    from cosmos_t2i.lora_formats import config_alpha

    configs = {"transformer": {"r": 4, "lora_alpha": 2.0}}
    assert config_alpha(configs, "text_conditioner.blocks.0.mlp.0", 4) == 4.0
    assert config_alpha(configs, "transformer_blocks.0.attn1.to_q", 4) == 2.0
