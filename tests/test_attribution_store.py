"""Feature store, end-to-end API and settings checks for the attribution engine."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_attribution import (
    QUERIES,
    TRAIN,
    make_gpt2,
    make_llama,
    one_thread,  # noqa: F401 (autouse fixture)
    ref_gradient,
    ref_inv_sqrt,
    ref_param_names,
    train_adafactor,
)

from trackstar.attribution import METHODS, AttributionSettings, TrackStar, attribute
from trackstar.attribution.features import extract_to_store
from trackstar.attribution.second_moment import EstimatedSecondMomentWarning
from trackstar.attribution.store import FeatureStore
from trackstar.io import ArtifactError


class Killed(RuntimeError):
    pass


def test_store_resumes_after_a_kill_from_the_last_finished_chunk(tokenizer, tmp_path):
    model = make_gpt2()
    settings = AttributionSettings(use_v=False, d=128, batch_size=2, chunk_rows=3)
    ts = TrackStar(model, tokenizer, settings, work_dir=tmp_path)
    examples = ts.training_examples(TRAIN)
    meta = ts._meta("train", list(range(len(TRAIN))), None, "loss", examples)
    extractor = __import__("trackstar.attribution.features", fromlist=["x"]).FeatureExtractor(
        model, ts.sites, ts.projector)

    calls = []

    def dying(batch):
        calls.append(len(batch.examples))
        if sum(calls) > 4:  # dies inside the second chunk of 3 rows
            raise Killed
        return extractor(batch)

    store = FeatureStore.create(tmp_path / "s", meta)
    with pytest.raises(Killed):
        extract_to_store(store, examples, dying, 2, 3)
    assert json.loads((tmp_path / "s" / "progress.json").read_text())["rows_done"] == 3
    with pytest.raises(ArtifactError, match="incomplete"):
        FeatureStore.open(tmp_path / "s", meta)

    calls.clear()
    resumed = FeatureStore.create(tmp_path / "s", meta)
    assert resumed.rows_done == 3
    extract_to_store(resumed, examples, extractor, 2, 3)
    done = FeatureStore.open(tmp_path / "s", meta)

    fresh = FeatureStore.create(tmp_path / "fresh", meta)
    extract_to_store(fresh, examples, extractor, 2, 3)
    assert np.array_equal(np.asarray(done.array), np.asarray(FeatureStore.open(tmp_path / "fresh").array))


def test_store_from_other_settings_is_refused(tokenizer, tmp_path):
    model = make_gpt2()
    a = TrackStar(model, tokenizer, AttributionSettings(use_v=False, d=128, seed=0), work_dir=tmp_path)
    store = a.featurize(a.training_examples(TRAIN), "train", list(range(len(TRAIN))), None,
                        path=tmp_path / "train")
    b = TrackStar(model, tokenizer, AttributionSettings(use_v=False, d=128, seed=1), work_dir=tmp_path)
    with pytest.raises(ArtifactError, match=r"meta\.json.*seed=0.*seed=1"):
        b.featurize(b.training_examples(TRAIN), "train", list(range(len(TRAIN))), None,
                    path=tmp_path / "train")
    q = b.featurize(b.query_examples(QUERIES), "query", [0, 1, 2], None, path=tmp_path / "q")
    with pytest.raises(ArtifactError, match="seed"):
        b.score(store, q)
    other_model = make_gpt2(seed=5)
    c = TrackStar(other_model, tokenizer, AttributionSettings(use_v=False, d=128), work_dir=tmp_path)
    with pytest.raises(ArtifactError, match="model_hash"):
        FeatureStore.open(tmp_path / "train", c._meta("train", list(range(len(TRAIN))), None, "loss"))
    other_texts = TRAIN[::-1]
    with pytest.raises(ArtifactError, match="examples_hash"):
        a.featurize(a.training_examples(other_texts), "train", list(range(len(TRAIN))), None,
                    path=tmp_path / "train")


def test_estimated_v_warns_and_is_recorded(tokenizer, tmp_path):
    model = make_llama()
    settings = METHODS["trackstar"].replace(d=14 * 16, k=3, v_estimate_batches=2, batch_size=4)
    with pytest.warns(EstimatedSecondMomentWarning, match="ESTIMATED"):
        result = attribute(model, tokenizer, TRAIN, QUERIES, settings, work_dir=tmp_path)
    assert result.v_source == "estimated"
    meta = json.loads((result.train_store / "meta.json").read_text())
    assert meta["v_source"] == "estimated"
    assert meta["param_names"] == ref_param_names(model)


def test_estimated_v_is_the_mean_squared_minibatch_gradient(tokenizer, monkeypatch):
    from trackstar.attribution import fused, output
    from trackstar.attribution.gradients import block_linear_sites
    from trackstar.attribution.output import collate
    from trackstar.attribution.second_moment import estimate_second_moment

    model = make_gpt2()
    ts = TrackStar(model, tokenizer, AttributionSettings(projection="identity"))
    ex = ts.training_examples(TRAIN)
    sites = block_linear_sites(model)
    model.transformer.ln_f.weight.requires_grad_(False)  # a user's own freezing survives the estimate
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    calls = []
    monkeypatch.setattr(output, "linear_token_loss", lambda *a: calls.append(1) or fused._LinearTokenLoss.apply(*a))
    with pytest.warns(EstimatedSecondMomentWarning):
        v = estimate_second_moment(model, [collate(ex[:4]), collate(ex[4:])], sites, eps=1e-8)
    assert len(calls) == 2  # the head frozen meanwhile: the fused loss, no whole logits
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    names = ref_param_names(model)
    per_ex = torch.stack([ref_gradient(model, tokenizer, names, text=t) for t in TRAIN])
    sq = ((per_ex[:4].mean(0) ** 2 + per_ex[4:].mean(0) ** 2) / 2)
    want = 1 / (sq.sqrt() + 1e-8)
    got = torch.cat([v[s.name].multiplier().reshape(-1) for s in sites]).double()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)


def test_gaussian_api_runs_are_identical_and_bf16_storage_is_close(tokenizer, tmp_path):
    model = make_gpt2()
    opt = train_adafactor(model, tokenizer, lr=0.01)
    s = METHODS["trackstar"].replace(d=8 * 16, k=4, lam="auto", batch_size=3)
    r1 = attribute(model, tokenizer, TRAIN, QUERIES, s, opt, work_dir=tmp_path / "a")
    r2 = attribute(model, tokenizer, TRAIN, QUERIES, s, opt, work_dir=tmp_path / "b")
    assert r1.proponent_ids == r2.proponent_ids and r1.proponent_scores == r2.proponent_scores
    assert 0 < r1.lam < 1
    r3 = attribute(model, tokenizer, TRAIN, QUERIES, s.replace(batch_size=8, padding_side="left"),
                   opt, work_dir=tmp_path / "c")
    np.testing.assert_allclose(r3.proponent_scores, r1.proponent_scores, rtol=1e-3, atol=1e-4)
    rb = attribute(model, tokenizer, TRAIN, QUERIES, s.replace(storage_dtype="bfloat16"), opt,
                   work_dir=tmp_path / "d")
    np.testing.assert_allclose(rb.proponent_scores, r1.proponent_scores, atol=0.05)
    assert np.load(rb.train_store / "features.npy").dtype == np.uint16


def test_block_diagonal_curvature_equals_formula(tokenizer, tmp_path):
    model = make_gpt2(width=8, layers=1)
    s = METHODS["exp5"].replace(projection="identity", block_diagonal=True, k=len(TRAIN), lam=0.5)
    res = attribute(model, tokenizer, TRAIN, QUERIES, s, work_dir=tmp_path)
    names = ref_param_names(model)
    g_t = torch.stack([ref_gradient(model, tokenizer, names, text=t) for t in TRAIN])
    g_q = torch.stack([ref_gradient(model, tokenizer, names, prompt=p, target=t) for p, t in QUERIES])
    params = dict(model.named_parameters())
    w_t, w_q, off = [], [], 0
    for n in names:
        sl = slice(off, off + params[n].numel())
        off = sl.stop
        r = 0.5 * g_q[:, sl].T @ g_q[:, sl] / 3 + 0.5 * g_t[:, sl].T @ g_t[:, sl] / len(TRAIN)
        w = ref_inv_sqrt(r, s.damping)
        w_t.append(g_t[:, sl] @ w)
        w_q.append(g_q[:, sl] @ w)
    t, q = torch.cat(w_t, 1), torch.cat(w_q, 1)
    want = (q / q.norm(dim=1, keepdim=True)) @ (t / t.norm(dim=1, keepdim=True)).T
    got = torch.zeros_like(want)
    for i in range(3):
        for j, v in zip(res.proponent_ids[i], res.proponent_scores[i]):
            got[i, j] = v
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * want.abs().max().item())


def test_settings_and_presets_validate():
    with pytest.raises(ValueError, match="output_fn"):
        AttributionSettings(output_fn="probability")
    with pytest.raises(ValueError, match="auto"):
        AttributionSettings(lam="sometimes")
    assert set(METHODS) == {"grad_dot", "grad_cosine", "trak", "exp1", "exp2", "exp3", "exp4",
                            "exp5", "trackstar", "first_order"}
    assert METHODS["trak"].output_fn == "margin" and not METHODS["trak"].unit_norm


def test_a_full_disk_is_a_clear_error_before_any_feature_is_written(tmp_path, monkeypatch):
    """Writing features through the memory map on a full disk died with SIGBUS (rc 135) and no
    message; the store now reserves its blocks when created and names what it needs."""
    import errno
    import os

    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this platform")
    meta = {"kind": "train", "row_ids": list(range(1000)), "d": 256, "dtype": "float32"}

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ArtifactError, match=r"No space left for the feature store .*needs 1\.0 MiB.*artifacts_dir"):
        FeatureStore.create(tmp_path / "s", meta)
    assert not (tmp_path / "s" / "features.npy").exists()
    monkeypatch.undo()
    store = FeatureStore.create(tmp_path / "s", meta)  # with space, the same store starts
    assert store.rows_done == 0 and store.array.shape == (1000, 256)
