"""The fusion modules: size, shape, normalisation, the no-retrieval case, masked missing
neighbours, the mean reference, save and load."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from reco.config import ConfigError
from reco.contracts import FUSION_WEIGHTS
from reco.fusion import FusionModule, RecoFusion, load_fusion, refine, save_fusion


def test_parameter_count_at_d512():
    n = sum(p.numel() for p in FusionModule(512).parameters())
    # attention 4d^2+4d, MLP 8d^2+5d, two LayerNorms 4d: about 3.2M, as the paper says.
    assert n == 12 * 512 ** 2 + 13 * 512 == 3_152_384
    assert sum(p.numel() for p in RecoFusion(512).parameters()) == 2 * n + 1


def test_output_is_unit_norm_and_uses_the_retrieved_tokens():
    torch.manual_seed(0)
    phi = FusionModule(64).eval()
    q, r = torch.randn(5, 64), torch.randn(5, 10, 64)
    out = phi(q, r)
    assert out.shape == (5, 64)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    assert not torch.allclose(out, phi(q, torch.randn(5, 10, 64)), atol=1e-3)
    # No positional embedding: the order of the retrieved items does not matter.
    torch.testing.assert_close(out, phi(q, r.flip(1)), atol=1e-5, rtol=1e-5)


def test_no_retrieval_sees_only_the_query():
    torch.manual_seed(0)
    phi = FusionModule(64).eval()
    q = torch.randn(3, 64)
    out = phi(q, torch.zeros(3, 0, 64))
    assert out.shape == (3, 64)
    torch.testing.assert_close(out[1:2], phi(q[1:2], torch.zeros(1, 0, 64)))


def test_width_must_divide_into_heads():
    with pytest.raises(ValueError, match="not divisible by heads"):
        FusionModule(60, heads=8)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = RecoFusion(64)
    meta = {"d": 64, "heads": 8, "mlp_ratio": 4.0, "k": 10, "retrieval": True}
    save_fusion(model, meta, str(tmp_path / "model"))
    loaded, got = load_fusion(str(tmp_path / "model"))
    assert got == meta and not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ConfigError, match="run `reco train` first"):
        load_fusion(str(tmp_path / "nothing"))


@pytest.mark.parametrize("damage", ["missing", "truncated", "not a checkpoint", "other keys"])
def test_unreadable_weights_are_a_clear_error(tmp_path, damage):
    """Weights deleted, cut short by a copy, replaced, or of another model: a ConfigError that
    names the file and the fix, not torch's traceback."""
    save_fusion(RecoFusion(64), {"d": 64, "heads": 8, "mlp_ratio": 4.0, "k": 10}, str(tmp_path))
    weights = tmp_path / FUSION_WEIGHTS
    if damage == "missing":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "not a checkpoint":
        weights.write_bytes(b"<html>not found</html>")
    else:  # d=32's, where d=64's are expected
        buf = io.BytesIO()
        torch.save(RecoFusion(32).state_dict(), buf)
        weights.write_bytes(buf.getvalue())
    with pytest.raises(ConfigError) as err:
        load_fusion(str(tmp_path))
    problem = {"missing": "are missing", "other keys": "are not a d=64 fusion model's tensors"}.get(
        damage, "are not a readable PyTorch checkpoint (cut short, or another file)")
    assert str(err.value) == (f"{weights}: the fusion weights {problem}; remove {tmp_path} and re-run "
                              "`reco train` to write them again")


def test_missing_neighbours_are_masked_not_fed_as_zeros():
    """A query with 3 of 5 slots padded (id -1, zeros) is refined as if given only its 3."""
    torch.manual_seed(0)
    phi = FusionModule(64).eval()
    q, r = torch.randn(4, 64), torch.randn(4, 5, 64)
    padded = r.clone()
    padded[:, 3:] = 0
    missing = torch.zeros(4, 5, dtype=torch.bool)
    missing[:, 3:] = True
    three = phi(q, r[:, :3])
    torch.testing.assert_close(phi(q, padded, missing), three, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(phi(q, padded), three, atol=1e-3), "zero tokens do change the output"
    # Also through refine, on the inference path, from the ids retrieve returns.
    ids = np.where(missing.numpy(), -1, 7)
    np.testing.assert_allclose(refine(phi, q.numpy(), padded.numpy(), ids), three.detach().numpy(), atol=1e-5)
    # All slots missing: the query alone.
    torch.testing.assert_close(phi(q, padded, torch.ones(4, 5, dtype=torch.bool)),
                               phi(q, torch.zeros(4, 0, 64)), atol=1e-5, rtol=1e-5)


def test_only_the_query_token_is_computed_as_the_full_layer_would():
    """FusionModule skips the other tokens' outputs: its result and gradients are the full
    encoder layer's at the query token, with and without missing slots."""
    torch.manual_seed(0)
    phi = FusionModule(64)
    q, r = torch.randn(6, 64), torch.randn(6, 10, 64)
    missing, weights = torch.rand(6, 10) < 0.3, torch.randn(6, 64)
    for mask in (None, missing):
        full_mask = None if mask is None else torch.nn.functional.pad(mask, (1, 0), value=False)
        full = torch.nn.functional.normalize(
            phi.layer(torch.cat([q.unsqueeze(1), r], 1), src_key_padding_mask=full_mask)[:, 0], dim=-1)
        ours = phi(q, r, mask)
        torch.testing.assert_close(ours, full, atol=1e-5, rtol=1e-5)
        grads = [torch.autograd.grad((out * weights).sum(), list(phi.parameters())) for out in (ours, full)]
        for mine, theirs in zip(*grads):
            assert theirs.abs().max() > 0
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


def test_mean_fusion_is_the_normalised_mean_of_the_neighbours_present():
    torch.manual_seed(0)
    model = RecoFusion(64, fuse="mean")
    assert [name for name, _ in model.named_parameters()] == ["logit_scale"], "nothing trained"
    q, r = torch.randn(3, 64), torch.randn(3, 4, 64)
    missing = torch.tensor([[False] * 4, [False, False, True, True], [True] * 4])
    v, _ = model(q, r, q, r, missing, missing)
    by_hand = [r[0].mean(0), r[1, :2].mean(0), q[2]]  # no neighbour: the query stays as it is
    torch.testing.assert_close(v, torch.stack([x / x.norm() for x in by_hand]))
