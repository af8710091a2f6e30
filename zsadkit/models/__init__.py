"""The CLIP backbone shared by every method: loading, the hookable image tower, the prompt-aware text tower.

Typical use::

    from zsadkit.models import load_clip, VisualEncoder, TextEncoder, AttentionVariant, tokenize

    clip = load_clip("ViT-L-14-336", "openai", image_size=518)   # or load_clip("zsad-tiny", image_size=112)
    visual, text = VisualEncoder(clip), TextEncoder(clip)
    with torch.no_grad():
        features = visual(images, layers=[24], global_ln_post=False,
                          attention=AttentionVariant.from_dpam_layer(20, visual.num_layers))
    text_features = text.encode_tokens(tokenize(["a photo of a normal bottle."]))
"""

from zsadkit.models.attention import ATTENTION_MODES, AttentionMode, HeadWeighting
from zsadkit.models.loader import (
    BUILTIN_RANDOM_MODELS,
    ClipSource,
    PretrainedWeightsUnavailableError,
    build_clip_from_openai_state_dict,
    load_backbone,
    load_clip,
    module_fingerprint,
    read_checkpoint,
)
from zsadkit.models.pos_embed import resize_position_embedding, set_visual_image_size
from zsadkit.models.text import TextEncoder, tokenize
from zsadkit.models.visual import (
    AttentionVariant,
    StreamState,
    VisualEncoder,
    VisualFeatures,
    sliding_windows,
)

__all__ = [
    "load_backbone",
    "ATTENTION_MODES",
    "AttentionMode",
    "AttentionVariant",
    "BUILTIN_RANDOM_MODELS",
    "ClipSource",
    "HeadWeighting",
    "PretrainedWeightsUnavailableError",
    "StreamState",
    "TextEncoder",
    "VisualEncoder",
    "VisualFeatures",
    "build_clip_from_openai_state_dict",
    "load_clip",
    "module_fingerprint",
    "read_checkpoint",
    "resize_position_embedding",
    "set_visual_image_size",
    "sliding_windows",
    "tokenize",
]
