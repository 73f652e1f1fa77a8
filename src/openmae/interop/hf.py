"""HuggingFace ViTMAE: key tables, config conversion, export and import.

HF checkpoints come in two layouts. The one on the Hub (transformers 4, and what
`save_pretrained` writes) names a layer `encoder.layer.<i>.attention.attention.query` etc.;
transformers 5 modules are named `layers.<i>.attention.q_proj` etc. Both are read; export writes
the layout of the installed transformers so that `ViTMAEForPreTraining.load_state_dict` takes it.
The one real transform is HF's split of the fused `qkv` projection into query, key and value.

transformers is optional: only export needs it (imported lazily); reading HF files does not.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from safetensors.torch import load_file
from torch import nn

from openmae.checkpoint.format import unwrap_model
from openmae.extras import require
from openmae.interop.keymap import Rule, rule, to_ours, to_theirs
from openmae.interop.reference import load_pickle
from openmae.models.mae import MAEConfig, MaskedAutoencoder

if TYPE_CHECKING:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

Layout = Literal["auto", "legacy", "v5"]

# Inside one transformer layer: openmae (timm) names -> HF names.
_LAYER_LEGACY = [
    ("norm1.", "layernorm_before."),
    ("attn.qkv.", "attention.attention.query.", "attention.attention.key.", "attention.attention.value."),
    ("attn.proj.", "attention.output.dense."),
    ("norm2.", "layernorm_after."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
]
_LAYER_V5 = [
    ("norm1.", "layernorm_before."),
    ("attn.qkv.", "attention.q_proj.", "attention.k_proj.", "attention.v_proj."),
    ("attn.proj.", "attention.o_proj."),
    ("norm2.", "layernorm_after."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
]


def _table(layer: list[tuple[str, ...]], encoder_layers: str) -> list[Rule]:
    """The key table of ViTMAEForPreTraining for one layout of its layers."""
    rules = [
        rule("cls_token", "vit.embeddings.cls_token"),
        rule("pos_embed", "vit.embeddings.position_embeddings"),
        rule("patch_embed.proj.", "vit.embeddings.patch_embeddings.projection."),
        rule("norm.", "vit.layernorm."),
        rule("decoder_embed.", "decoder.decoder_embed."),
        rule("mask_token", "decoder.mask_token"),
        rule("decoder_pos_embed", "decoder.decoder_pos_embed"),
        rule("decoder_norm.", "decoder.decoder_norm."),
        rule("decoder_pred.", "decoder.decoder_pred."),
    ]
    for ours, *theirs in layer:
        rules.append(rule(f"blocks.{{i}}.{ours}", *(f"vit.{encoder_layers}.{{i}}.{t}" for t in theirs)))
        rules.append(
            rule(f"decoder_blocks.{{i}}.{ours}", *(f"decoder.decoder_layers.{{i}}.{t}" for t in theirs))
        )
    return rules


HF_TABLES: dict[str, list[Rule]] = {
    "legacy": _table(_LAYER_LEGACY, "encoder.layer"),
    "v5": _table(_LAYER_V5, "layers"),
}

# Other spellings of the same weights, rewritten before the table is applied: a bare ViTMAEModel
# has no `vit.` prefix; transformers 5's save_pretrained writes decoder layers this way.
_HF_ALIASES = [
    (re.compile(r"^(embeddings|encoder|layers|layernorm)\."), r"vit.\1."),
    (re.compile(r"^decoder\.decoder_encoder\.layer\."), "decoder.decoder_layers."),
]

# ViTMAEConfig's defaults: config.json files may leave default values out.
HF_DEFAULTS = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
    "decoder_num_attention_heads": 16,
    "decoder_hidden_size": 512,
    "decoder_num_hidden_layers": 8,
    "decoder_intermediate_size": 2048,
    "mask_ratio": 0.75,
    "norm_pix_loss": False,
}

OPENMAE_LAYER_NORM_EPS = 1e-6


def is_hf_state_dict(state: dict[str, torch.Tensor]) -> bool:
    """True for ViTMAEForPreTraining / ViTMAEModel weights (either layout)."""
    return "vit.embeddings.cls_token" in state or "embeddings.cls_token" in state


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ViTMAEForPreTraining / ViTMAEModel weights (either layout) -> openmae names."""
    renamed = {}
    for key, tensor in state.items():
        for pattern, replacement in _HF_ALIASES:
            key = pattern.sub(replacement, key)
        renamed[key] = tensor
    layout = "v5" if any(".q_proj." in k for k in renamed) else "legacy"
    return to_ours(renamed, HF_TABLES[layout], f"HuggingFace ViTMAE ({layout} layout)")


def mae_config_from_hf(hf: dict) -> MAEConfig:
    """An openmae MAEConfig from a ViTMAE `config.json` dict."""
    hf = {**HF_DEFAULTS, **hf}
    if hf["hidden_act"] != "gelu" or not hf["qkv_bias"]:
        raise ValueError(
            f"openmae needs hidden_act='gelu' and qkv_bias=True, got {hf['hidden_act']!r}, {hf['qkv_bias']}"
        )
    if abs(hf["layer_norm_eps"] - OPENMAE_LAYER_NORM_EPS) > 1e-12:
        warnings.warn(
            f"the HF config has layer_norm_eps={hf['layer_norm_eps']}; openmae uses {OPENMAE_LAYER_NORM_EPS} "
            "(the MAE reference's value), so outputs differ very slightly",
            stacklevel=3,
        )
    D, Dd = hf["hidden_size"], hf["decoder_hidden_size"]
    mlp_ratio = hf["intermediate_size"] / D
    if hf["decoder_intermediate_size"] != int(Dd * mlp_ratio):
        raise ValueError(
            "the HF decoder's MLP ratio differs from the encoder's; openmae uses one ratio for both"
        )
    patch = hf["patch_size"]
    if not isinstance(patch, int):
        if patch[0] != patch[1]:
            raise ValueError(f"non-square patches {patch} are not supported")
        patch = patch[0]
    image = hf["image_size"]
    return MAEConfig(
        img_size=image if isinstance(image, int) else tuple(image),
        patch_size=patch,
        in_chans=hf["num_channels"],
        embed_dim=D,
        depth=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        mlp_ratio=mlp_ratio,
        decoder_embed_dim=Dd,
        decoder_depth=hf["decoder_num_hidden_layers"],
        decoder_num_heads=hf["decoder_num_attention_heads"],
        mask_ratio=hf["mask_ratio"],
        norm_pix_loss=hf["norm_pix_loss"],
    )


def read_hf_dir(path: Path) -> tuple[dict[str, torch.Tensor], MAEConfig]:
    """Weights (in openmae names) and config of a HF model folder (config.json + weights)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} is a folder without config.json; expected a HuggingFace ViTMAE folder")
    hf = json.loads(config_file.read_text())
    if hf.get("model_type", "vit_mae") != "vit_mae":
        raise ValueError(f"{path} holds a HF {hf['model_type']!r} model; openmae reads 'vit_mae' only")
    return from_hf_state_dict(_read_hf_weights(path)), mae_config_from_hf(hf)


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a HF folder: one file or shards listed in an index, safetensors preferred."""
    for name, read in (("model.safetensors", load_file), ("pytorch_model.bin", load_pickle)):
        if (path / name).is_file():
            return dict(read(path / name))
        index = path / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in read(path / shard).items()}
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or their index) in {path}")


# ------------------------------------------------------------------------------------------------
# Export (needs transformers).


def _transformers():
    return require("transformers")


def hf_config_dict(config: MAEConfig) -> dict:
    """ViTMAEConfig fields of an openmae MAE (square images only: HF's position tables are square)."""
    H, W = config.img_size
    if H != W:
        raise ValueError(f"HF ViTMAE supports square images only, got {H}x{W}")
    if config.encoder_mask_tokens:
        raise ValueError("HF ViTMAE has no variant with mask tokens in the encoder")
    if config.global_pool != "token":
        raise ValueError("HF ViTMAE has a final encoder norm; export a model with global_pool='token'")
    return {
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "intermediate_size": int(config.embed_dim * config.mlp_ratio),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": OPENMAE_LAYER_NORM_EPS,
        "image_size": H,
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "qkv_bias": True,
        "decoder_num_attention_heads": config.decoder_num_heads,
        "decoder_hidden_size": config.decoder_embed_dim,
        "decoder_num_hidden_layers": config.decoder_depth,
        "decoder_intermediate_size": int(config.decoder_embed_dim * config.mlp_ratio),
        "mask_ratio": config.mask_ratio,
        "norm_pix_loss": config.norm_pix_loss,
    }


def installed_layout(hf_config: ViTMAEConfig) -> str:
    """The key layout of the installed transformers, read off a weightless (meta) model."""
    with torch.device("meta"):
        keys = _transformers().ViTMAEForPreTraining(hf_config).state_dict().keys()
    return "v5" if any(".q_proj." in k for k in keys) else "legacy"


def export_hf(model: nn.Module, layout: Layout = "auto") -> tuple[ViTMAEConfig, dict[str, torch.Tensor]]:
    """A MaskedAutoencoder as HF `(ViTMAEConfig, state_dict)` for `ViTMAEForPreTraining`.

    Args:
        model: an openmae MaskedAutoencoder with square images and global_pool="token".
        layout: HF key layout, "auto" (that of the installed transformers), "legacy" (the Hub's,
            transformers 4) or "v5".
    """
    model = unwrap_model(model)
    if not isinstance(model, MaskedAutoencoder):
        raise TypeError(
            f"export_hf needs a MaskedAutoencoder (HF ViTMAE has a decoder), got {type(model).__name__}"
        )
    transformers = _transformers()
    hf_config = transformers.ViTMAEConfig(
        architectures=["ViTMAEForPreTraining"], **hf_config_dict(model.config)
    )
    if layout == "auto":
        layout = installed_layout(hf_config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return hf_config, to_theirs(state, HF_TABLES[layout], "HuggingFace ViTMAE")


def to_hf(model: nn.Module) -> ViTMAEForPreTraining:
    """A HF `ViTMAEForPreTraining` (eval mode) with the weights of an openmae MaskedAutoencoder."""
    hf_config, state = export_hf(model)
    hf_model = _transformers().ViTMAEForPreTraining(hf_config)
    hf_model.load_state_dict(state, strict=True)
    return hf_model.eval()
