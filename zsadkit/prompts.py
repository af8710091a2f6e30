"""Hand-written text prompts of the CLIP-based baselines, and their ensembling into one embedding per state.

A prompt ensemble is states × templates: each state ("flawless {}", "damaged {}") is filled with the class
phrase, then placed into every template ("a photo of a {}."). The sentences of one state group (normal or
anomalous) are encoded and averaged into a single class embedding (`ensemble_text_features`).

Ensembles (`PROMPT_ENSEMBLES`):
    "clip": AnomalyCLIP App. A.2, "a photo of a normal [cls]" / "a photo of an anomalous [cls]" (1 + 1).
    "clip-ac": CLIP's 80 ImageNet templates (Radford et al. 2021) around "normal [cls]" / "anomalous [cls]"
        (80 + 80).
    "winclip": WinCLIP's compositional prompt ensemble (Jeong et al. 2023, Sec. 4.1): 7 normal × 4 anomalous
        states × 22 templates (the mala-lab/InCTRL list) = 154 + 88 sentences.
    "winclip-21": the same states with the 21-entry template list of anomalib and zqhang/WinCLIP-pytorch (one
        template duplicated, two missing: 20 unique) = 147 + 84 sentences.
    "vand": VAND/April-GAN (Chen et al. 2023): 7 normal × 5 anomalous states (WinCLIP's + "broken {}") × 35
        templates (30 CLIP ImageNet templates + 5 scene templates) = 245 + 175 sentences.
    "aaclip": AA-CLIP (Ma et al. 2025; Mwxinnn/AA-CLIP @ 53db195, dataset/constants.py PROMPTS): 3 normal × 5
        anomalous states × 2 templates = 6 + 10 sentences.

Averaging: VAND (VAND-APRIL-GAN @ f13b8a6, `prompt_ensemble.py:25-27`), mala-lab WinCLIP and InCTRL L2-normalise each sentence embedding before
the mean (``normalize_prompts=True``, the default); anomalib averages the raw embeddings
(``normalize_prompts=False``). Either way the result is re-normalised, which leaves every cosine unchanged.

Example:
    >>> PROMPT_ENSEMBLES["winclip"].sentences("metal nut", "anomalous")[0]
    'a cropped photo of the damaged metal nut.'
    >>> len(PROMPT_ENSEMBLES["winclip"].sentences("bottle", "normal"))
    154
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from zsadkit.models import TextEncoder, tokenize
from zsadkit.models.runtime import frozen_features

__all__ = [
    "class_phrase",
    "class_text_features",
    "ClassTextFeatures",
    "CLIP_IMAGENET_TEMPLATES",
    "encode_sentences",
    "ensemble_text_features",
    "prompt_ensemble",
    "PROMPT_ENSEMBLES",
    "PromptEnsemble",
    "STATES",
    "VAND_ANOMALOUS_STATES",
    "VAND_NORMAL_STATES",
    "VAND_TEMPLATES",
    "WINCLIP_ANOMALOUS_STATES",
    "WINCLIP_NORMAL_STATES",
    "WINCLIP_TEMPLATES",
    "WINCLIP_TEMPLATES_21",
]

State = Literal["normal", "anomalous"]
STATES: tuple[State, State] = ("normal", "anomalous")

# CLIP's 80 ImageNet templates (Radford et al. 2021), in open_clip's order, as format strings.
CLIP_IMAGENET_TEMPLATES: tuple[str, ...] = tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)

# WinCLIP compositional prompt ensemble, state level (Jeong et al. 2023, Sec. 4.1 and its supplement).
WINCLIP_NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
WINCLIP_ANOMALOUS_STATES: tuple[str, ...] = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")

# Template level: the 22-entry list of mala-lab/WinCLIP and InCTRL (18 CLIP ImageNet templates + 4 AD ones).
WINCLIP_TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of a {}.",
    "a dark photo of the {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of the {}.",
    "a photo of a {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for anomaly detection.",
    "a photo of the {} for anomaly detection.",
)

# anomalib's and zqhang/WinCLIP-pytorch's 21 entries: "a jpeg corrupted photo of the {}." twice, without
# "a cropped photo of a {}." and "a jpeg corrupted photo of a {}.".
WINCLIP_TEMPLATES_21: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)

# VAND/April-GAN (prompt_ensemble.py of ByChelsea/VAND-APRIL-GAN @ f13b8a6), in the reference's order.
VAND_NORMAL_STATES: tuple[str, ...] = WINCLIP_NORMAL_STATES
VAND_ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
VAND_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)

# AA-CLIP (Mwxinnn/AA-CLIP @ 53db195, dataset/constants.py PROMPTS), in the reference's order.
AACLIP_NORMAL_STATES: tuple[str, ...] = ("{}", "a {}", "the {}")
AACLIP_ANOMALOUS_STATES: tuple[str, ...] = (
    "a damaged {}",
    "a broken {}",
    "a {} with flaw",
    "a {} with defect",
    "a {} with damage",
)
AACLIP_TEMPLATES: tuple[str, ...] = ("{}.", "a photo of {}.")


@dataclass(frozen=True)
class PromptEnsemble:
    """States × templates for the normal and the anomalous class.

    Attributes:
        name: registry key.
        normal_states: format strings with one "{}" for the class phrase.
        anomalous_states: idem.
        templates: format strings with one "{}" for the filled state.
    """

    name: str
    normal_states: tuple[str, ...]
    anomalous_states: tuple[str, ...]
    templates: tuple[str, ...]

    def __post_init__(self) -> None:
        for kind, strings in (("state", self.normal_states + self.anomalous_states), ("template", self.templates)):
            bad = [s for s in strings if s.count("{}") != 1]
            if bad or not strings:
                raise ValueError(f"prompt ensemble {self.name!r}: every {kind} needs exactly one '{{}}', got {bad}")

    def sentences(self, class_phrase: str, state: State) -> list[str]:
        """All sentences of one state group, state-major (as VAND and anomalib enumerate them)."""
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        states = self.normal_states if state == "normal" else self.anomalous_states
        return [template.format(s.format(class_phrase)) for s in states for template in self.templates]


PROMPT_ENSEMBLES: dict[str, PromptEnsemble] = {
    ensemble.name: ensemble
    for ensemble in (
        PromptEnsemble("clip", ("a photo of a normal {}",), ("a photo of an anomalous {}",), ("{}",)),
        PromptEnsemble("clip-ac", ("normal {}",), ("anomalous {}",), CLIP_IMAGENET_TEMPLATES),
        PromptEnsemble("winclip", WINCLIP_NORMAL_STATES, WINCLIP_ANOMALOUS_STATES, WINCLIP_TEMPLATES),
        PromptEnsemble("winclip-21", WINCLIP_NORMAL_STATES, WINCLIP_ANOMALOUS_STATES, WINCLIP_TEMPLATES_21),
        PromptEnsemble("vand", VAND_NORMAL_STATES, VAND_ANOMALOUS_STATES, VAND_TEMPLATES),
        PromptEnsemble("aaclip", AACLIP_NORMAL_STATES, AACLIP_ANOMALOUS_STATES, AACLIP_TEMPLATES),
    )
}


def prompt_ensemble(name: str) -> PromptEnsemble:
    """A registered ensemble by name; an unknown name lists the known ones."""
    if name not in PROMPT_ENSEMBLES:
        raise KeyError(f"unknown prompt ensemble {name!r}; known: {sorted(PROMPT_ENSEMBLES)}")
    return PROMPT_ENSEMBLES[name]


def class_phrase(class_name: str, replace_underscores: bool = True) -> str:
    """The text put in place of [cls]: "metal_nut" → "metal nut" (InCTRL, mala-lab), or verbatim (VAND)."""
    return class_name.replace("_", " ") if replace_underscores else class_name


def ensemble_text_features(sentence_features: torch.Tensor, normalize_prompts: bool = True) -> torch.Tensor:
    """Average sentence embeddings into one unit-norm class embedding.

    Args:
        sentence_features: (P, D) embeddings of the P sentences of one state group.
        normalize_prompts: L2-normalise each sentence before the mean (VAND, mala-lab, InCTRL); False averages
            the raw embeddings (anomalib WinCLIP).
    Returns:
        (D,) the mean, L2-normalised.
    """
    if sentence_features.ndim != 2 or sentence_features.shape[0] == 0:
        raise ValueError(f"sentence_features must be (P, D) with P >= 1, got {tuple(sentence_features.shape)}")
    if normalize_prompts:
        sentence_features = F.normalize(sentence_features, dim=-1)
    return F.normalize(sentence_features.mean(dim=0), dim=-1)


@torch.no_grad()
def encode_sentences(text_encoder: TextEncoder, sentences: Sequence[str]) -> torch.Tensor:
    """(P, D) unnormalised text features of sentences, equal to CLIP's ``encode_text`` but faster.

    The padding after the longest sentence's end-of-text token is cut off before encoding: the text tower's
    causal mask means no earlier token attends to it, so the end-of-text features are unchanged (to float
    rounding) while the sequence shrinks from 77 to ~15 tokens.
    """
    device = text_encoder.clip.token_embedding.weight.device
    token_ids = tokenize(list(sentences))
    used = int(token_ids.argmax(dim=-1).max()) + 1
    return text_encoder.encode_tokens(token_ids[:, :used].to(device))


def class_text_features(
    encode_sentences: Callable[[Sequence[str]], torch.Tensor],
    ensemble: PromptEnsemble,
    class_name: str,
    *,
    normalize_prompts: bool = True,
    replace_underscores: bool = True,
) -> torch.Tensor:
    """The (normal, anomalous) text embeddings of one class.

    Args:
        encode_sentences: strings → (P, D) text embeddings (CLIP's text tower, unnormalised).
        ensemble: the prompt ensemble.
        class_name: dataset class name, e.g. "metal_nut".
        normalize_prompts: see `ensemble_text_features`.
        replace_underscores: see `class_phrase`.
    Returns:
        (2, D) unit-norm rows: normal, anomalous.
    """
    phrase = class_phrase(class_name, replace_underscores)
    return torch.stack(
        [
            ensemble_text_features(encode_sentences(ensemble.sentences(phrase, state)), normalize_prompts)
            for state in STATES
        ]
    )


class ClassTextFeatures:
    """The (normal, anomalous) embeddings of a prompt ensemble per class name, computed once per class.

    Args:
        text_encoder: CLIP's text tower.
        ensemble: the prompt ensemble.
        normalize_prompts: see `ensemble_text_features`.
        replace_underscores: see `class_phrase`.
    """

    def __init__(
        self,
        text_encoder: TextEncoder,
        ensemble: PromptEnsemble,
        *,
        normalize_prompts: bool = True,
        replace_underscores: bool = True,
    ) -> None:
        self.text_encoder = text_encoder
        self.ensemble = ensemble
        self.normalize_prompts = normalize_prompts
        self.replace_underscores = replace_underscores
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, class_name: str) -> torch.Tensor:
        """(2, D) unit-norm (normal, anomalous) embeddings of one class (float32, no graph; an ordinary tensor even
        when first asked for inside `torch.inference_mode`, so that training may use it later)."""
        if class_name not in self.cache:
            with frozen_features():
                self.cache[class_name] = class_text_features(
                    lambda sentences: encode_sentences(self.text_encoder, sentences),
                    self.ensemble,
                    class_name,
                    normalize_prompts=self.normalize_prompts,
                    replace_underscores=self.replace_underscores,
                )
        return self.cache[class_name]

    def batch(self, class_names: Sequence[str]) -> torch.Tensor:
        """(B, 2, D) embeddings of each image's class."""
        return torch.stack([self(name) for name in class_names])
