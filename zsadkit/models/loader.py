"""One loader for CLIP: open_clip name + tag, a local checkpoint, an in-memory state dict, or a tiny random model.

Every path returns an open_clip ``CLIP`` model in float32 eval mode whose positional embedding has been resized
once for the requested input side (as AnomalyCLIP's `VisionTransformer.forward` does on its first call,
`AnomalyCLIP_lib/AnomalyCLIP.py:368` @ 45ed4dd). Which weights were loaded is recorded in
``model.zsad_source`` (a `ClipSource`) so result tables can say what produced them.

Checkpoint formats (``checkpoint=``):

* ``.safetensors``: read with safetensors.
* a plain ``torch.save``-d state dict (``.pt``/``.pth``/``.bin``, optionally under a ``"state_dict"`` key):
  ``torch.load(weights_only=True)``.
* an OpenAI TorchScript archive (``ViT-L-14-336px.pt``): ``torch.jit.load(map_location="cpu").state_dict()``.
  This is the only load that is not ``weights_only``: TorchScript archives hold serialized TorchScript code
  (not arbitrary pickles); only open archives you trust.
* ``.npz`` (numpy arrays, ``allow_pickle=False``), the format of the test fixtures.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from torch import nn

from zsadkit.models.pos_embed import POS_EMBED_RESIZE_METHODS, PosEmbedResize, set_visual_image_size

__all__ = [
    "build_clip_from_openai_state_dict",
    "BUILTIN_RANDOM_MODELS",
    "ClipSource",
    "CONFIG_DIR",
    "is_openai_release",
    "load_backbone",
    "load_clip",
    "module_fingerprint",
    "PretrainedWeightsUnavailableError",
    "read_checkpoint",
    "WEIGHT_FILE_SUFFIXES",
]

CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR)

#: Built-in random-weight configurations (offline use, tests), asked for by name.
BUILTIN_RANDOM_MODELS: tuple[str, ...] = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))

# Scalars that OpenAI JIT archives carry next to the weights (open_clip and the references drop them), and the
# causal text mask, a buffer that TorchScript archives of open_clip models save although it is rebuilt at init.
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
_OPENAI_REQUIRED_KEYS = (
    "visual.conv1.weight",
    "visual.positional_embedding",
    "visual.proj",
    "text_projection",
    "positional_embedding",
    "token_embedding.weight",
    "ln_final.weight",
)


#: Suffixes that make `load_backbone` read `pretrained` as a weights file rather than an open_clip tag.
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")


class PretrainedWeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but could not be obtained (offline and not cached, or download failed)."""


@dataclass(frozen=True)
class ClipSource:
    """Where a loaded CLIP came from (recorded on the model as ``model.zsad_source``).

    Attributes:
        model: open_clip config name, or ``"openai-state-dict"`` when the architecture was inferred.
        pretrained: open_clip pretrained tag, or None.
        checkpoint: local weights file, or None (``"<in-memory>"`` for a state dict passed directly).
        native_image_size: input side the weights were trained at (position-embedding grid × patch).
        image_size: input side the model was resized for.
        pos_embed_resize: interpolation used when ``image_size != native_image_size``.
        quick_gelu: whether the MLPs use QuickGELU (OpenAI) instead of nn.GELU.
        random_init: True for randomly initialised weights (built-in tiny models, or a name without weights).
    """

    model: str
    pretrained: str | None
    checkpoint: str | None
    native_image_size: int
    image_size: int
    pos_embed_resize: str
    quick_gelu: bool
    random_init: bool


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat state dict of CPU tensors (see the module docstring for formats).

    Args:
        path: ``.safetensors``, ``.npz``, a ``torch.save``-d state dict, or an OpenAI TorchScript archive.

    Returns:
        ``{name: tensor}``, with a leading ``"module."`` (DataParallel) prefix removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP checkpoint {path} does not exist (expected a .pt/.pth/.safetensors/.npz file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(str(path), device="cpu")
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            state_dict = {key: torch.from_numpy(arrays[key].copy()) for key in arrays.files}
    elif _is_torchscript_archive(path):
        with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export; still the format
            warnings.simplefilter("ignore", FutureWarning)
            state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(loaded, Mapping) and "state_dict" in loaded:
            loaded = loaded["state_dict"]
        if not isinstance(loaded, Mapping):
            raise ValueError(f"CLIP checkpoint {path}: expected a state dict, got {type(loaded).__name__}")
        state_dict = dict(loaded)
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    return state_dict


@functools.cache
def openai_release_sha256() -> frozenset[str]:
    """sha256 digests of OpenAI's published CLIP archives (the hex folder of open_clip's `openai` download URLs)."""
    digests = set()
    for name, tag in open_clip.list_pretrained():
        url = open_clip.get_pretrained_cfg(name, tag).get("url", "") if tag == "openai" else ""
        if "openaipublic" in url:
            digests.add(url.split("/")[-2])
    return frozenset(digests)


def _uses_quick_gelu(clip: torch.nn.Module) -> bool:
    """Whether the model's MLPs use open_clip's QuickGELU."""
    return any(type(module).__name__ == "QuickGELU" for module in clip.modules())


def is_openai_release(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike | None = None) -> bool:
    """True for OpenAI's own weights: a state dict with the scalar entries of OpenAI's archives
    (``input_resolution``, ``context_length``, ``vocab_size``), or a file whose sha256 is a published OpenAI release.
    Their MLPs use QuickGELU; `load_clip` builds them so whether they come with an architecture name or not."""
    if any(key in state_dict for key in ("input_resolution", "context_length", "vocab_size")):
        return True
    if path is None:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest() in openai_release_sha256()


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def build_clip_from_openai_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    quick_gelu: bool = True,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    source: str = "state dict",
) -> CLIP:
    """Build a float32 open_clip ``CLIP`` whose architecture is inferred from an OpenAI-format ViT state dict.

    Follows the reference ``build_model`` (AnomalyCLIP `AnomalyCLIP_lib/build_model.py:5-27` @ 45ed4dd): widths, layers, patch, grid, embed dim and
    context length from tensor shapes; **heads = width // 64 for both towers** unless overridden. Unlike
    ``open_clip.model.build_model_from_openai_state_dict`` the weights are never cast to fp16 (the references
    run fp32), so float32 state dicts keep their exact values.

    Args:
        state_dict: OpenAI-format keys (``visual.conv1.weight``, ``transformer.resblocks.*``, ...). The scalar
            entries ``input_resolution``/``context_length``/``vocab_size`` (and ``attn_mask``) are ignored.
        quick_gelu: QuickGELU (OpenAI weights) if True, ``nn.GELU`` otherwise (e.g. VAND at a non-native size).
        vision_heads: override for the vision head count.
        text_heads: override for the text head count.
        source: name of the file or object, used in error messages.

    Returns:
        ``CLIP`` in eval mode, float32, at the state dict's native image size.
    """
    missing = [key for key in _OPENAI_REQUIRED_KEYS if key not in state_dict]
    if missing:
        raise ValueError(
            f"CLIP {source}: not an OpenAI-format ViT state dict, missing keys {missing}. "
            "(ResNet CLIPs are not supported; for open_clip-format checkpoints of other layouts pass `model=` "
            "with the open_clip config name.)"
        )
    vision_width = state_dict["visual.conv1.weight"].shape[0]
    vision_layers = sum(
        1 for key in state_dict if key.startswith("visual.transformer.resblocks.") and key.endswith(".attn.in_proj_weight")
    )
    patch_size = state_dict["visual.conv1.weight"].shape[-1]
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state_dict["ln_final.weight"].shape[0]
    text_layers = sum(
        1 for key in state_dict if key.startswith("transformer.resblocks.") and key.endswith(".attn.in_proj_weight")
    )
    vision_heads = vision_heads or vision_width // 64
    text_heads = text_heads or text_width // 64
    if vision_heads < 1 or vision_width % vision_heads or text_heads < 1 or text_width % text_heads:
        raise ValueError(
            f"CLIP {source}: head counts must divide the widths (vision {vision_width}/{vision_heads}, "
            f"text {text_width}/{text_heads}); pass vision_heads=/text_heads="
        )
    vision_cfg = CLIPVisionCfg(
        layers=vision_layers,
        width=vision_width,
        head_width=vision_width // vision_heads,
        patch_size=patch_size,
        image_size=patch_size * grid,
    )
    text_cfg = CLIPTextCfg(
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        width=text_width,
        heads=text_heads,
        layers=text_layers,
    )
    with torch.random.fork_rng(devices=[]):
        model = CLIP(state_dict["text_projection"].shape[1], vision_cfg, text_cfg, quick_gelu=quick_gelu)
    _load_weights(model, state_dict, source)
    return model.eval()


def _load_weights(model: CLIP, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    weights = {key: value for key, value in state_dict.items() if key not in _NON_WEIGHT_KEYS}
    if "logit_scale" in weights and weights["logit_scale"].ndim != model.logit_scale.ndim:
        weights["logit_scale"] = weights["logit_scale"].reshape(model.logit_scale.shape)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong_shape = [
        f"{key}: {tuple(weights[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in weights and weights[key].shape != expected[key].shape
    ]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"CLIP {source} does not match the architecture: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, wrong shapes {wrong_shape[:5]}"
        )
    model.load_state_dict({key: value.float() for key, value in weights.items()}, strict=True)


def load_clip(
    model: str | None = None,
    pretrained: str | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    image_size: int | None = None,
    pos_embed_resize: PosEmbedResize = "bilinear",
    quick_gelu: bool | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> CLIP:
    """Load a CLIP in float32 eval mode from one of four sources, resized for ``image_size`` inputs.

    Sources (give exactly one of ``model``-with-``pretrained``, ``checkpoint``, ``state_dict``, or a built-in
    random ``model``):

    1. ``load_clip("ViT-L-14-336", "openai", image_size=518)``: open_clip name + pretrained tag. Downloads on
       first use into the open_clip/Hugging Face cache (``cache_dir`` to change it). Offline without cached
       weights this raises `PretrainedWeightsUnavailableError`, never a random model.
    2. ``load_clip(checkpoint="ViT-L-14-336px.pt", image_size=518)``: a local OpenAI archive, state dict
       ``.pt``, ``.safetensors`` or ``.npz``. The architecture is inferred from the shapes (OpenAI rules,
       QuickGELU), or taken from the open_clip config ``model`` when given. One line on stdout names the file
       (open_clip's "initialized randomly" warning for the model it builds first is silenced).
    3. ``load_clip(state_dict=sd)``: an OpenAI-format state dict in memory (same inference).
    4. ``load_clip("zsad-tiny", image_size=112)``: a built-in tiny random configuration (offline tests),
       initialised deterministically from ``seed`` without touching the global RNG. Any other open_clip name
       without ``pretrained`` also gives a seeded random model (with a warning).

    Args:
        model: open_clip config name (``"ViT-L-14-336"``, ``"zsad-tiny"``, ...).
        pretrained: open_clip pretrained tag (``"openai"``, ``"laion400m_e31"``), only with ``model``.
        checkpoint: local weights file.
        state_dict: weights in memory, OpenAI key layout.
        image_size: input side S; the positional embedding is resized once for it. None = native size.
        pos_embed_resize: ``"bilinear"`` (default, reference AnomalyCLIP: bilinear, no antialias, class row
            kept) or ``"open_clip"`` (bicubic + antialias, as the forked open_clip of VAND and AA-CLIP).
        quick_gelu: activation override. None follows the weights' origin: QuickGELU for OpenAI's weights
            (`is_openai_release`: a JIT archive or state dict with OpenAI's scalar entries, or a file with a
            published OpenAI sha256) and for inferred architectures (OpenAI's rule), the tag's setting for name +
            tag, the config's setting otherwise. False gives ``nn.GELU`` (the VAND fixture).
        vision_heads: head-count override when the architecture is inferred (default width // 64).
        text_heads: head-count override when the architecture is inferred (default width // 64).
        cache_dir: download cache for name + tag.
        device: where to put the model.
        seed: seed of the random initialisation (random models only).

    Returns:
        open_clip ``CLIP`` (fp32, eval) with ``model.zsad_source`` set to a `ClipSource`.
    """
    if pretrained is not None and model is None:
        raise ValueError(f"load_clip: pretrained={pretrained!r} needs model= (an open_clip config name)")
    if checkpoint is not None and state_dict is not None:
        raise ValueError("load_clip: pass either checkpoint= or state_dict=, not both")
    if pretrained is not None and (checkpoint is not None or state_dict is not None):
        raise ValueError("load_clip: pass either pretrained= (a tag) or checkpoint=/state_dict=, not both")
    if model is None and checkpoint is None and state_dict is None:
        raise ValueError(
            "load_clip needs a source: model= with pretrained= (open_clip name + tag), checkpoint= (a weights "
            f"file), state_dict= (OpenAI-format weights), or one of the built-in random models {BUILTIN_RANDOM_MODELS}"
        )

    if model is not None and (vision_heads is not None or text_heads is not None):
        raise ValueError("load_clip: vision_heads=/text_heads= apply to inferred architectures; with model= the "
                         f"open_clip config {model!r} fixes the head counts")
    if pos_embed_resize not in POS_EMBED_RESIZE_METHODS:
        raise ValueError(f"load_clip: pos_embed_resize must be one of {POS_EMBED_RESIZE_METHODS}, got {pos_embed_resize!r}")

    random_init = False
    if checkpoint is not None or state_dict is not None:
        source = str(checkpoint) if checkpoint is not None else "<in-memory>"
        weights = read_checkpoint(checkpoint) if checkpoint is not None else dict(state_dict)
        if quick_gelu is None and (model is None or is_openai_release(weights, checkpoint)):
            quick_gelu = True  # OpenAI's weights use QuickGELU, however they are passed
        if model is None:
            clip = build_clip_from_openai_state_dict(
                weights, quick_gelu=quick_gelu, vision_heads=vision_heads, text_heads=text_heads, source=source
            )
        else:
            clip = _create_open_clip(model, None, quick_gelu, cache_dir, seed, weights_follow=True)
            _load_weights(clip, weights, source)
        if checkpoint is not None:
            activation = "QuickGELU" if _uses_quick_gelu(clip) else (
                "GELU; OpenAI-trained weights saved without OpenAI's scalar entries need quick_gelu=True or the "
                "'-quickgelu' model name")
            print(f"zsadkit: loaded CLIP weights ({model or 'architecture inferred from the weights'}) from {source} "
                  f"(MLP activation: {activation})")
        model_name = model or "openai-state-dict"
    else:
        if open_clip.get_model_config(model) is None:
            raise ValueError(f"load_clip: unknown open_clip model {model!r}; see open_clip.list_models()")
        if pretrained is None:
            if model not in BUILTIN_RANDOM_MODELS:
                warnings.warn(
                    f"load_clip({model!r}) without pretrained= gives a randomly initialised model (seed {seed})",
                    stacklevel=2,
                )
            random_init = True
        clip = _create_open_clip(model, pretrained, quick_gelu, cache_dir, seed)
        source, model_name = None, model

    native = clip.visual.image_size[0]
    target = native if image_size is None else int(image_size)
    if target != native:
        set_visual_image_size(clip.visual, target, pos_embed_resize)
    clip = clip.float().eval().to(device)
    clip.zsad_source = ClipSource(
        model=model_name,
        pretrained=pretrained,
        checkpoint=source,
        native_image_size=native,
        image_size=target,
        pos_embed_resize=pos_embed_resize,
        quick_gelu=_uses_quick_gelu(clip),
        random_init=random_init,
    )
    return clip


def _uses_quick_gelu(clip: CLIP) -> bool:
    return isinstance(clip.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


def _create_open_clip(
    model: str,
    pretrained: str | None,
    quick_gelu: bool | None,
    cache_dir: str | os.PathLike | None,
    seed: int,
    weights_follow: bool = False,
) -> CLIP:
    """open_clip's model; `weights_follow` (weights are loaded from a file next) silences its "initialized
    randomly" warning, as for the built-in random models, where random weights are the point."""
    if open_clip.get_model_config(model) is None:
        raise ValueError(f"load_clip: unknown open_clip model {model!r}; see open_clip.list_models()")
    overrides = {} if quick_gelu is None else {"quick_gelu": quick_gelu}
    if pretrained is not None:
        tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
        if not tag_cfg:
            raise ValueError(
                f"load_clip: unknown pretrained tag {pretrained!r} for {model!r}; available tags: "
                f"{open_clip.list_pretrained_tags_by_model(model)} (or pass checkpoint= with a weights file)"
            )
        if quick_gelu is None:
            overrides["quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
    quiet = weights_follow or model in BUILTIN_RANDOM_MODELS  # open_clip would log "initialized randomly"
    previous_disable = logging.root.manager.disable
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if quiet:
            logging.disable(logging.WARNING)
        try:
            clip = open_clip.create_model(
                model,
                pretrained=pretrained,
                precision="fp32",
                device="cpu",
                cache_dir=None if cache_dir is None else str(cache_dir),
                require_pretrained=pretrained is not None,
                **overrides,
            )
        except RuntimeError as error:
            if pretrained is None:
                raise
            raise PretrainedWeightsUnavailableError(
                f"Could not obtain the pretrained weights of model {model!r} with tag {pretrained!r} "
                f"(cache: {cache_dir or 'the open_clip/Hugging Face default'}). Two ways out: (1) run once with "
                "internet access so the weights are downloaded into the cache; (2) pass a local weights file, e.g. "
                f"load_clip(checkpoint='/path/to/ViT-L-14-336px.pt') or load_clip({model!r}, "
                f"checkpoint='/path/to/open_clip_model.safetensors'); from the command line, --pretrained "
                "/path/to/weights (zsadkit predict, python -m zsadkit.reproduce) or --set winclip_pretrained=/path "
                f"for a notebook's second backbone. Cause: {error}"
            ) from error
        finally:
            logging.disable(previous_disable)
    if not isinstance(clip, CLIP):
        raise ValueError(
            f"load_clip: {model!r} builds a {type(clip).__name__}; zsadkit supports open_clip CLIP ViT models "
            "(text tower built in, not CustomTextCLIP/CoCa)"
        )
    return clip


def load_backbone(
    backbone: str = "zsad-tiny",
    pretrained: str = "",
    image_size: int = 112,
    device: str | torch.device = "cpu",
    seed: int = 0,
    **loader_options,
) -> CLIP:
    """A CLIP from the notebooks' run settings (the fields of `zsadkit.experiment.RunConfig`).

    Args:
        backbone: open_clip config name ("ViT-L-14-336", "ViT-B-16-plus-240") or a built-in random model
            ("zsad-tiny"); "openai-state-dict" with a weights file infers the architecture from the weights.
        pretrained: "" (random weights, seeded), an open_clip pretrained tag ("openai", "laion400m_e31"), or
            the path of a local weights file.
        image_size: input side S.
        device: torch device.
        seed: seed of random weights.
        **loader_options: passed to `load_clip` (``pos_embed_resize``, ``quick_gelu``, ...).
    """
    common = dict(image_size=image_size, device=device, **loader_options)
    if not pretrained:
        return load_clip(backbone, seed=seed, **common)
    path = Path(pretrained).expanduser()
    if path.is_file():
        model = None if backbone == "openai-state-dict" else backbone
        return load_clip(model, checkpoint=path, **common)
    if path.suffix in WEIGHT_FILE_SUFFIXES or "/" in pretrained:
        raise FileNotFoundError(
            f"pretrained={pretrained!r} looks like a weights file but does not exist (expected a .pt, .pth, "
            ".safetensors or .npz file, or an open_clip tag such as 'openai')"
        )
    return load_clip(backbone, pretrained, **common)


def module_fingerprint(module: nn.Module, samples_per_tensor: int = 1024) -> str:
    """A cheap identity of a module's weights: names, shapes, float64 sums and a strided sample of each tensor.

    Any realistic change of weights (another checkpoint, another seed, a resized position embedding) changes it.
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::stride][:samples_per_tensor].to("cpu", torch.float64)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{float(flat.double().sum())!r}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()
