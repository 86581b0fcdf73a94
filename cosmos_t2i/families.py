"""Model families on the Cosmos-Predict2 DiT: everything that differs between Cosmos-Predict2 and Anima, in one place.

The trainer, precompute, pipeline and exports take a Family and use what it names; none of them asks which family
it is. Predict2 is NVIDIA's recipe (docs/training.md, docs/sampling.md); Anima is the model author's (docs/anima.md).

A family's text side is a module with the same functions (t5.py for Predict2, anima_text.py for Anima):
    FOLDER, SUFFIX, COLUMN      where precomputed text lives: <dataset>/FOLDER/<image stem>SUFFIX, or a COLUMN
    MAX_LENGTH                  token limit of the stored text
    load_encoder(path, device, dtype=None, load_in_8bit=False) -> encoder       (for precompute and sampling)
    encode_captions(encoder, captions, max_length, batch_size, on_batch, too_long) -> [item]
    write_text(path, item), read_text(path) -> item, to_column(item), from_column(value, source) -> item,
    column_feature()            the datasets feature of COLUMN
    sample_fields(item) -> {name: tensor}    one training sample's text, fixed shapes (so batches stack)
    placeholder_fields()        the same for a sample that could not be read
    model_inputs(batch, to_device)           a batch's text as the DiT takes it (a context, or the adapter's inputs)
    drop_captions(text, keep)   caption dropout: dropped samples get the family's empty caption
    prompt_inputs(encoder, prompts, device)  prompts as the DiT takes them (sampling, validation), as the training data
"""

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    text_module: str            # cosmos_t2i.<text_module>: the text side described above
    model_builder: str          # "module:function" of cosmos_t2i building a random model (model_size, dtype, device)
    model_loader: str           # "module:function" loading one from a weight file or folder, as models.load_transformer
    text_encoder: str           # default --text_encoder
    precompute_flags: str       # what precompute_t5.py needs to write this family's text (named in messages)
    has_text_adapter: bool      # a trainable text adapter sits between the text encoder and the DiT (--adapter_lr)
    vae_class: str              # the diffusers class of its VAE
    loss_scale: float           # default --loss_scale: the velocity MSE's factor
    lora_targets: str           # default --lora_target_modules (NVIDIA module names)
    sampler: str                # default sampler, its steps, guidance, flow shift and negative prompt
    num_steps: int
    guidance: float
    shift: float
    negative_prompt: str | None

    @property
    def text(self):
        return importlib.import_module(f"cosmos_t2i.{self.text_module}")

    def new_model(self, model_size: str, dtype=None, device="cpu", **overrides):
        """A randomly initialised model of a registry size, as this family trains it (Anima: adapter attached)."""
        import torch
        return _function(self.model_builder)(model_size, dtype or torch.float32, device, **overrides)

    def load_model(self, path, model_size=None, load_ema=False, dtype=None, device="cpu", state=None):
        """The model from a weight file, a diffusers folder (or random for no path), as this family trains it."""
        import torch
        return _function(self.model_loader)(path, model_size, load_ema, dtype or torch.bfloat16, device, state)


def _function(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(f"cosmos_t2i.{module}"), name)


NVIDIA_LORA_TARGETS = "q_proj,k_proj,v_proj,output_proj,mlp.layer1,mlp.layer2"

PREDICT2 = Family(
    name="predict2", text_module="t5", model_builder="models:new_transformer",
    model_loader="models:load_transformer", text_encoder="google-t5/t5-11b", precompute_flags="", has_text_adapter=False,
    vae_class="AutoencoderKLWan",
    loss_scale=10.0, lora_targets=NVIDIA_LORA_TARGETS,
    # NVIDIA's: RectifiedFlowAB2 over Karras sigmas, x0-space guidance x0 = c + 4 (c - u), a zero negative
    sampler="ab2", num_steps=35, guidance=4.0, shift=1.0, negative_prompt=None)

ANIMA = Family(
    name="anima", text_module="anima_text", model_builder="anima:new_anima", model_loader="anima:load_anima_model",
    text_encoder="circlestone-labs/Anima-Base-v1.0-Diffusers",
    precompute_flags=" --family anima", has_text_adapter=True, vae_class="AutoencoderKLQwenImage",
    # diffusion-pipe's (the author's trainer): the plain mean velocity MSE, the same logit-normal t as Predict2
    loss_scale=1.0, lora_targets=NVIDIA_LORA_TARGETS,
    # diffusers' AnimaModularPipeline: FlowMatchEuler with shift 3 over linspace(1, 1/N, N), CFG 4 against ""
    sampler="flow_euler", num_steps=50, guidance=4.0, shift=3.0, negative_prompt="")

FAMILIES = {f.name: f for f in (PREDICT2, ANIMA)}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}.")
    return FAMILIES[name]
