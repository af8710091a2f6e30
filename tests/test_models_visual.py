"""VisualEncoder: AnomalyCLIP reference parity (DPAM), open_clip parity, attention variants, hooks, windows."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import fixture_arrays

from zsadkit.models import AttentionVariant, StreamState, VisualEncoder, sliding_windows
from zsadkit.models.attention import head_attention

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def encoder(clip):
    return VisualEncoder(clip)


@pytest.fixture(scope="module")
def images():
    return fixture_arrays("inputs.npz")["images"]


@pytest.mark.parametrize(
    ("fixture", "dpam_layer"),
    [("visual_dpam.npz", 4), ("visual_nodpam.npz", None), ("visual_dpam_all.npz", 5)],
)
def test_dpam_tokens_and_global_embedding_match_the_reference(encoder, images, fixture, dpam_layer):
    reference = fixture_arrays(fixture)
    attention = None if dpam_layer is None else AttentionVariant.from_dpam_layer(dpam_layer, encoder.num_layers)
    with torch.no_grad():
        out = encoder(images, [1, 2, 3, 4], global_ln_post=False, attention=attention)
    torch.testing.assert_close(out.global_embedding, reference["image_features"], **TOL)
    torch.testing.assert_close(torch.stack(out.layer_tokens), reference["patch_tokens"], **TOL)
    assert out.layer_tokens[0].shape == (2, 50, 32) and out.patch_tokens[0].shape == (2, 49, 32)


def test_dpam_intermediates_match_the_reference_streams(encoder, images):
    reference = fixture_arrays("visual_dpam.npz")
    attention = AttentionVariant.from_dpam_layer(4, encoder.num_layers)
    assert attention.first_layer == 2
    with torch.no_grad():
        torch.testing.assert_close(encoder.embed(images), reference["ln_pre_out"], **TOL)
        dpam = encoder(images, [1, 2, 3, 4], tokens="raw", global_ln_post=False, attention=attention)
        plain = encoder(images, [1, 2, 3, 4], tokens="raw")
    torch.testing.assert_close(torch.stack(dpam.layer_tokens), reference["raw_out_tokens"], **TOL)
    torch.testing.assert_close(torch.stack(dpam.layer_tokens), reference["block_vv"], **TOL)
    torch.testing.assert_close(dpam.final_tokens, reference["final_ori_tokens"], **TOL)
    # the original stream of the dual path is plain CLIP
    torch.testing.assert_close(torch.stack(plain.layer_tokens), reference["block_ori"], **TOL)


def test_plain_forward_equals_open_clip_encode_image(clip, encoder, images):
    with torch.no_grad():
        out = encoder(images, [4], tokens="raw")
        expected = clip.encode_image(images)
    # SDPA (ours) vs open_clip's nn.MultiheadAttention: the same formula, summed in another order
    torch.testing.assert_close(out.global_embedding, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.layer_tokens[0], out.final_tokens, rtol=0, atol=0)


def test_single_path_qk_variant_and_unit_head_weights_leave_clip_unchanged(encoder, images):
    with torch.no_grad():
        plain = encoder(images, [2, 4], tokens="raw")
        single_qk = encoder(images, [2, 4], tokens="raw", attention=AttentionVariant(("qk",), 1, path="single"))
        unit = encoder(images, [2, 4], tokens="raw", head_weights={layer: torch.ones(2) for layer in (1, 2, 3, 4)})
    torch.testing.assert_close(torch.stack(single_qk.layer_tokens), torch.stack(plain.layer_tokens), **TOL)
    torch.testing.assert_close(single_qk.global_embedding, plain.global_embedding, **TOL)
    # Unit head weights are exact: the block's own attention plus a correction that is exactly zero.
    assert torch.equal(torch.stack(unit.layer_tokens), torch.stack(plain.layer_tokens))
    assert torch.equal(unit.global_embedding, plain.global_embedding)


def test_mode_ensemble_side_stream_is_the_mean_of_the_single_mode_streams(encoder, images):
    """x_side = h^(f-1) + Σ Out(mean of modes) = mean of the per-mode side streams (Out is affine)."""
    with torch.no_grad():
        runs = {
            modes: encoder(images, [3, 4], tokens="raw", attention=AttentionVariant(modes, first_layer=2))
            for modes in (("vv",), ("qq",), ("vv", "qq"))
        }
    for index in range(2):
        mean = (runs[("vv",)].layer_tokens[index] + runs[("qq",)].layer_tokens[index]) / 2
        torch.testing.assert_close(runs[("vv", "qq")].layer_tokens[index], mean, **TOL)
    assert (runs[("vv",)].layer_tokens[1] - runs[("qq",)].layer_tokens[1]).abs().max() > 1e-3


def test_head_weights_equal_scaling_the_out_proj_columns_of_each_head(clip, images):
    weights = torch.tensor([0.5, 2.0])
    with torch.no_grad():
        weighted = VisualEncoder(clip)(images, [3], tokens="raw", head_weights={2: weights})
        scaled_clip = copy.deepcopy(clip)
        out_proj = scaled_clip.visual.transformer.resblocks[1].attn.out_proj
        out_proj.weight[:, :64] *= weights[0]
        out_proj.weight[:, 64:] *= weights[1]
        expected = VisualEncoder(scaled_clip)(images, [3], tokens="raw")
        per_image = VisualEncoder(clip)(images, [3], tokens="raw", head_weights={2: weights.expand(2, 2)})
        by_callable = VisualEncoder(clip)(
            images, [3], tokens="raw", head_weights={2: lambda heads: heads * weights.view(1, 2, 1, 1)}
        )
    for other in (weighted, per_image, by_callable):
        torch.testing.assert_close(other.layer_tokens[0], expected.layer_tokens[0], **TOL)
        torch.testing.assert_close(other.global_embedding, expected.global_embedding, **TOL)
    with pytest.raises(ValueError, match="head weights must have shape"):
        VisualEncoder(clip)(images, [3], head_weights={2: torch.ones(3)})


def test_adapter_output_replaces_the_residual_stream_and_receives_gradients(encoder, images):
    scale = torch.nn.Parameter(torch.tensor(0.5))
    out = encoder(images[:1], [2, 4], tokens="raw", adapters={2: lambda tokens: tokens * scale})
    with torch.no_grad():
        plain = encoder(images[:1], [2], tokens="raw", return_global=False)
        expected = plain.layer_tokens[0] * 0.5
        for block in encoder.blocks[2:]:
            expected = block(expected)
    torch.testing.assert_close(out.layer_tokens[0], plain.layer_tokens[0] * 0.5, **TOL)
    torch.testing.assert_close(out.layer_tokens[1], expected, **TOL)
    out.global_embedding.sum().backward()
    assert scale.grad is not None and scale.grad.abs() > 0


def test_single_path_vv_is_per_image_unless_batch_mixing_is_asked_for(encoder, images):
    per_image = AttentionVariant(("vv",), first_layer=2, path="single")
    mixing = AttentionVariant(("vv",), first_layer=2, path="single", batch_mixing=True)
    with torch.no_grad():
        alone = encoder(images[:1], [4], attention=per_image).layer_tokens[0]
        in_batch = encoder(images, [4], attention=per_image).layer_tokens[0][:1]
        mixed_alone = encoder(images[:1], [4], attention=mixing).layer_tokens[0]
        mixed_in_batch = encoder(images, [4], attention=mixing).layer_tokens[0][:1]
        dual = encoder(images[:1], [4], attention=AttentionVariant(("vv",), first_layer=2)).layer_tokens[0]
    torch.testing.assert_close(alone, in_batch, **TOL)
    assert (mixed_alone - mixed_in_batch).abs().max() > 1e-3  # AA-CLIP's cross-batch mixing
    assert (alone - dual).abs().max() > 1e-3  # single path (MLP kept) differs from the dual side stream


def test_batch_mixing_with_one_image_makes_each_token_attend_to_itself_only():
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    torch.testing.assert_close(head_attention(q, k, v, ("vv",), batch_mixing=True), v, rtol=0, atol=1e-6)


def test_stop_early_returns_the_same_taps_without_global(encoder, images):
    with torch.no_grad():
        full = encoder(images, [2], attention=AttentionVariant(("vv",), 2))
        early = encoder(images, [2], attention=AttentionVariant(("vv",), 2), return_global=False)
    assert early.global_embedding is None and early.final_tokens is None
    torch.testing.assert_close(early.layer_tokens[0], full.layer_tokens[0], rtol=0, atol=0)


@pytest.mark.parametrize("next_layer", [1, 2, 3, 4])
@pytest.mark.parametrize("dpam", [False, True])
def test_forward_resumed_from_a_stream_state_equals_the_full_forward(encoder, images, next_layer, dpam):
    """Stopping before a block and resuming there (HeadCLIP's cache of the frozen blocks) changes nothing, with
    head weights on both streams after the state and DPAM starting before, at or after it."""
    attention = AttentionVariant(("vv",), first_layer=2) if dpam else None
    late = range(max(next_layer, 2 if dpam else 1), 5)
    weights = {layer: torch.tensor([0.7, 1.6]) for layer in range(next_layer, 5)}
    side_weights = {layer: torch.tensor([1.3, 0.4]) for layer in late} if dpam else None
    options = dict(tokens="raw", global_ln_post=False, attention=attention, head_weights=weights,
                   side_head_weights=side_weights)
    with torch.no_grad():
        full = encoder(images, range(next_layer, 5), **options)
        state = encoder.stream_state(images, next_layer, attention=attention)
        resumed = encoder(None, range(next_layer, 5), start=state, **options)
    assert state.next_layer == next_layer and (state.side is not None) == (dpam and next_layer > 2)
    for ours, expected in zip(resumed.layer_tokens, full.layer_tokens, strict=True):
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(resumed.global_embedding, full.global_embedding, rtol=0, atol=1e-6)


def test_a_stream_state_that_does_not_fit_the_forward_is_refused(encoder, images):
    dpam = AttentionVariant(("vv",), first_layer=2)
    with torch.no_grad():
        state = encoder.stream_state(images, 3, attention=dpam)
    with pytest.raises(ValueError, match=r"layers or hooks \[2\] precede the start state"):
        encoder(None, [2, 4], start=state, attention=dpam)
    with pytest.raises(ValueError, match="has a side stream"):
        encoder(None, [4], start=state)
    with pytest.raises(ValueError, match="lacks a side"):
        encoder(None, [4], start=StreamState(3, state.hidden), attention=dpam)
    with pytest.raises(ValueError, match="images or a start state, not both"):
        encoder(images, [4], start=state, attention=dpam)
    with pytest.raises(ValueError, match="hooks at \\[3\\] belong to the resumed forward"):
        encoder.stream_state(images, 3, head_weights={3: torch.ones(2)})
    with pytest.raises(ValueError, match="next_layer is 1-indexed"):
        encoder.stream_state(images, 5)


def test_sliding_windows_enumerate_row_major_patch_indices():
    windows = sliding_windows(7, 2)
    assert windows.shape == (36, 4)
    assert windows[0].tolist() == [0, 1, 7, 8] and windows[-1].tolist() == [40, 41, 47, 48]
    assert sliding_windows(7, 3).shape == (25, 9)


def test_window_embeddings_are_batched_masked_token_forwards(clip, encoder, images):
    full_grid = torch.arange(49).view(1, 49)
    windows = sliding_windows(7, 3)
    with torch.no_grad():
        whole = encoder.encode_windows(images, full_grid)
        batched = encoder.encode_windows(images, windows)
        chunked = encoder.encode_windows(images, windows, windows_per_pass=4)
        # independent path through open_clip's own modules: gather after _embeds, run the transformer, _pool
        tokens = clip.visual._embeds(images)
        sequence = torch.cat([tokens[:, :1], tokens[:, windows[7] + 1]], dim=1)
        pooled, _ = clip.visual._pool(clip.visual.transformer(sequence))
        expected_window = pooled @ clip.visual.proj
    torch.testing.assert_close(whole[:, 0], clip.encode_image(images), **TOL)
    assert batched.shape == (2, 25, 32)
    torch.testing.assert_close(batched[:, 7], expected_window, **TOL)
    torch.testing.assert_close(chunked, batched, **TOL)
    with pytest.raises(ValueError, match="window indices"):
        encoder.encode_windows(images, torch.tensor([[0, 49]]))


def test_wrong_image_size_and_layer_indices_are_reported(encoder, images):
    with pytest.raises(ValueError, match=r"\(B, 3, 112, 112\)"):
        encoder(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="1-indexed"):
        encoder(images, [0])
    with pytest.raises(ValueError, match="modes"):
        AttentionVariant(("vk",))
