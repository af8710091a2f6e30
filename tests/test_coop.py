"""CoOp for ZSAD: "[V1..VN] normal [cls]" / "[V1..VN] anomalous [cls]", scored and trained like AnomalyCLIP."""

import math

import pytest
import torch
import torch.nn.functional as F

from zsadkit.engine import evaluate
from zsadkit.experiment import RunConfig, load_split
from zsadkit.methods.base import build_method
from zsadkit.methods.coop import CoOpConfig
from zsadkit.models import tokenize
from zsadkit.recipes.coop import OPTIMIZERS, fit, train_config
from zsadkit.training import TrainConfig, learning_rate

SIZE = 64


@pytest.fixture(scope="module")
def coop():
    return build_method("coop", backbone="zsad-tiny", image_size=SIZE, backbone_seed=2, train_seed=2)


def test_prompts_are_sixteen_context_words_then_state_word_then_class(coop):
    texts = coop.prompt_learner.prompt_texts(["metal_nut", "screw"])
    placeholders = " ".join(["X"] * 16)
    assert texts == [f"{placeholders} normal metal nut.", f"{placeholders} anomalous metal nut.",
                     f"{placeholders} normal screw.", f"{placeholders} anomalous screw."]


def test_one_context_is_shared_by_both_prompts_and_is_the_only_trainable_tensor(coop):
    parameters = coop.trainable_parameters()
    assert list(parameters) == ["contexts"]
    assert parameters["contexts"].shape == (1, 16, 128)  # 16 · W trainable numbers
    prompts = coop.prompt_learner(["bottle"])
    context = parameters["contexts"][0]
    assert torch.equal(prompts.embeddings[0, 1:17], context) and torch.equal(prompts.embeddings[1, 1:17], context)
    words = coop.text.embed_tokens(tokenize(["normal bottle.", "anomalous bottle."]))
    assert torch.equal(prompts.embeddings[0, 17:20], words[0, 1:4])  # "normal bottle ." after the context
    assert torch.equal(prompts.embeddings[1, 17:20], words[1, 1:4])
    assert prompts.deep_prompts == []


def test_no_dpam_and_four_layers_as_configured(coop):
    assert coop.config.dpam_first_layer is None and coop.attention_variants == [None]
    assert coop.config.feature_layers == (1, 2, 3, 4)


def test_image_score_is_eq1_with_tau_007_on_the_global_embedding_without_ln_post(coop):
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    scores = coop.predict(images, ["bottle", "bottle"]).image_scores
    visual = coop.visual.visual
    with torch.no_grad():
        hidden = coop.visual.embed(images)
        for block in coop.visual.blocks:
            hidden = block(hidden)
        image = F.normalize(hidden[:, 0] @ visual.proj, dim=-1)
        text = coop.encode_text(["bottle"])[0]
    assert torch.allclose(scores, (image @ text.T / 0.07).softmax(dim=-1)[:, 1], atol=1e-5)


def test_coop_trains_on_synthetic_aux_and_scores_synthetic_target(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path))
    model = build_method("coop", backbone="zsad-tiny", image_size=SIZE)
    before = model.trainable_parameters()["contexts"].detach().clone()
    aux = [s for s in load_split(cfg, "synth-aux") if s.class_name in ("fabric", "nut")]
    result = fit(model, aux, TrainConfig(epochs=2, batch_size=8), cache_root=tmp_path / "cache")
    assert len(result.log) == 2 and result.log[1]["loss"] < result.log[0]["loss"]
    assert not torch.equal(before, model.trainable_parameters()["contexts"])
    target = [s for s in load_split(cfg, "synth-target") if s.class_name in ("mesh", "coin")]
    rows = evaluate(model, target, dataset="synth-target", image_size=SIZE, batch_size=20, pro=None,
                    progress=False)
    means = rows[rows["class_name"] == "mean"]
    assert {"image", "pixel"} <= set(means["level"]) and means["value"].between(0, 1).all()


def test_unknown_options_are_rejected():
    with pytest.raises(TypeError, match="unknown options"):
        build_method("coop", backbone="zsad-tiny", image_size=SIZE, n_context=4)
    assert CoOpConfig().shared_context and not CoOpConfig().object_agnostic


def test_default_training_is_coops_sgd_with_warmup_and_cosine_and_adam_is_a_named_option():
    config = train_config()
    assert (config.optimizer, config.lr, config.momentum, config.weight_decay) == ("sgd", 0.002, 0.9, 5e-4)
    assert (config.schedule, config.warmup_epochs, config.warmup_lr, config.batch_size) == ("cosine", 1, 1e-5, 32)
    # Dassl's ConstantWarmupScheduler + CosineAnnealingLR(T_max=15): 1e-5, then 0.002·½(1 + cos(π(e − 1)/15)).
    assert learning_rate(config, 0, 0) == 1e-5
    assert learning_rate(config, 1, 99) == pytest.approx(0.002)
    assert learning_rate(config, 6, 0) == pytest.approx(0.001 * (1 + math.cos(math.pi * 5 / 15)))
    adam = train_config("anomalyclip", epochs=3)
    assert (adam.optimizer, adam.lr, adam.betas, adam.batch_size, adam.epochs) == ("adam", 1e-3, (0.5, 0.999), 8, 3)
    assert set(OPTIMIZERS) == {"coop", "anomalyclip"}
    with pytest.raises(KeyError, match="coop"):
        train_config("adamw")
