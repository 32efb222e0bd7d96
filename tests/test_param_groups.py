"""``orthoptim.param_groups``: routing by module type and name on ecosystem-style models (built
locally, no downloads), the output-head rule and its warning, tied weights, overrides."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from ecosystem_models import TorchvisionStyleViT
from torch import nn

from orthoptim import FOGO, param_groups
from orthoptim.benchmarks.gpt import GPT, GPTConfig
from orthoptim.benchmarks.models import MLP

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _routing(model: nn.Module, **kw) -> tuple[set[str], set[str]]:
    """(orthogonalized names, AdamW names), with every warning turned into an error."""
    names = {id(p): n for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = param_groups(model, verbose=False, **kw)
    by_alg = {g["algorithm"]: {names[id(p)] for p in g["params"]} for g in groups}
    return by_alg.get("fogo", set()), by_alg.get("adamw", set())


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_trainable_parameter_once_and_frozen_ones_left_out():
    model = TorchvisionStyleViT()
    model.encoder.ln.weight.requires_grad_(False)
    ortho, adamw = _routing(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert ortho | adamw == trainable and not ortho & adamw


def test_torchvision_style_vit_tokens_positions_and_head_go_to_adamw():
    ortho, adamw = _routing(TorchvisionStyleViT())
    # (1, 1, d) and (1, T, d) look like Conv1d kernels by shape; module information says not.
    assert {"class_token", "encoder.pos_embedding", "heads.head.weight"} <= adamw
    layer = "encoder.layers.encoder_layer_0"
    assert {
        "conv_proj.weight",
        f"{layer}.self_attention.in_proj_weight",  # set on MHA, which has a child: still a layer
        f"{layer}.self_attention.out_proj.weight",
        f"{layer}.mlp.0.weight",
        f"{layer}.mlp.3.weight",
    } <= ortho
    assert all(n.endswith("weight") for n in ortho)


def test_timm_style_vit_and_weight_decay_split():
    example = _load_example("timm_param_groups")
    model = example.VisionTransformer()
    ortho, adamw = _routing(model)
    assert {"cls_token", "pos_embed", "head.weight", "head.bias", "norm.weight"} <= adamw
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight"} <= (
        ortho
    )
    names = {id(p): n for n, p in model.named_parameters()}
    groups = example.timm_style_groups(model, 0.05, lr=1e-3)
    decay = {(g["algorithm"], g["weight_decay"]): {names[id(p)] for p in g["params"]}
             for g in groups}  # fmt: skip
    assert set(decay) == {("fogo", 0.05), ("adamw", 0.05), ("adamw", 0.0)}
    assert decay[("adamw", 0.05)] == {"head.weight"}
    assert {"cls_token", "pos_embed", "head.bias"} <= decay[("adamw", 0.0)]
    assert all(g["lr"] == 1e-3 for g in groups)


def test_timm_example_trains_with_fogo_on_the_right_tensors():
    result = _load_example("timm_param_groups").main(["--steps", "3"])
    opt, model = result["optimizer"], result["model"]
    assert len(result["losses"]) == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
    # FOGO state (momentum streams) only for the orthogonalized tensors; AdamW moments elsewhere.
    assert "momentum_slow" in opt.state[model.blocks[0].attn.qkv.weight]
    assert "momentum_slow" not in opt.state[model.pos_embed]
    assert "exp_avg" in opt.state[model.pos_embed]


def test_hf_style_gpt_embeddings_and_head():
    # nanoGPT uses GPT-2's names: transformer.wte / wpe, c_attn, c_fc, c_proj, lm_head.
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8))
    ortho, adamw = _routing(model)
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= adamw
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_proj.weight"} <= ortho
    # lm_head.weight is tied to wte: listed once, as the embedding.
    assert "lm_head.weight" not in {n for n, _ in model.named_parameters()} | ortho


def test_real_hf_gpt2_built_locally():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)  # random init from the config: no download
    ortho, adamw = _routing(model)
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= adamw
    # HF's Conv1D (GPT-2's attention and MLP) is a leaf layer: orthogonalized.
    assert "transformer.h.1.attn.c_attn.weight" in ortho
    assert "transformer.h.1.mlp.c_fc.weight" in ortho
    assert not any("lm_head" in n for n in ortho)


def test_sequential_last_layer_is_the_head_without_a_warning():
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    ortho, adamw = _routing(model)  # a warning would raise here
    assert ortho == {"1.weight"} and adamw == {"1.bias", "3.weight", "3.bias"}
    # Nested: the last layer registered, inside the inner Sequential.
    nested = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3)))
    assert _routing(nested)[0] == {"0.weight", "1.0.weight"}


def test_last_layer_inside_a_head_named_container_is_the_head():
    class VGGLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
            self.classifier = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    ortho, adamw = _routing(VGGLike())
    # The hidden layer of the classifier stays orthogonalized; only its output layer is the head.
    assert ortho == {"features.0.weight", "classifier.0.weight"}
    assert "classifier.2.weight" in adamw


def test_guessed_head_warns_once_naming_the_layer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.b = nn.Linear(8, 3)

    with pytest.warns(UserWarning, match="treating the last layer with a weight matrix, 'b'"):
        groups = param_groups(Net(), verbose=False)
    assert [len(g["params"]) for g in groups] == [1, 3]


def test_parameter_set_on_a_container_is_not_a_layer_weight():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.gate = nn.Parameter(torch.ones(4, 4))  # the block's own tensor, not a layer's

    model = nn.Sequential(Block(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"0\.gate \(not a layer weight: set on '0' \(Block\)\)"):
        groups = param_groups(model)
    assert any(p is model[0].gate for p in groups[1]["params"])


def test_head_and_embedding_names_can_be_overridden():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 8)
            self.out = nn.Linear(8, 3)
            self.aux = nn.Linear(8, 8)  # registered last, but not the output

    ortho, adamw = _routing(Net(), head_names=("out",))
    assert ortho == {"fc1.weight", "aux.weight"} and "out.weight" in adamw
    assert "head.weight" in _routing(MLP(12, widths=(8,), num_classes=3), head_names=("head",))[1]
    vit = TorchvisionStyleViT()
    ortho, adamw = _routing(vit, embedding_names=())
    assert "class_token" in adamw  # still: set on a container, not a layer weight
    gpt = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8))
    assert "transformer.wte.weight" in _routing(gpt, embedding_names=())[1]  # nn.Embedding type


def test_routing_note_lists_adamw_matrices_with_reasons():
    with pytest.warns(UserWarning) as record:
        param_groups(TorchvisionStyleViT())
    note = " ".join(str(w.message) for w in record)
    assert "class_token (embedding)" in note and "heads.head.weight (output head)" in note


def test_group_options_copied_and_fogo_accepts_the_groups():
    model = TorchvisionStyleViT()
    groups = param_groups(model, verbose=False, lr=2e-3, weight_decay=0.1)
    assert [g["algorithm"] for g in groups] == ["fogo", "adamw"]
    assert all(g["lr"] == 2e-3 and g["weight_decay"] == 0.1 for g in groups)
    opt = FOGO(groups)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    assert "momentum_slow" in opt.state[model.conv_proj.weight]
    assert "exp_avg" in opt.state[model.class_token]
