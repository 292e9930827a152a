"""Round 8 (mutation testing): the MIL models' outputs and the training loop's bookkeeping written out by hand from
the papers' formulas and the documented rules, so that a slip in the code (a dropped gate, a missing 1/sqrt(d), the
other CLAM loss weight, the wrong early-stopping sign, an unordered tile subset) fails a test."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gigaslide.mil.models import build_model
from gigaslide.mil.train import TrainConfig, class_weights, predict, train_fold

torch.set_num_threads(1)


def _lin(layer, x):
    return x @ layer.weight.T + layer.bias


def _gated_scores(att, h):
    """Ilse et al. (2018), eq. 9: w^T (tanh(V h) * sigm(U h)), one column per attention branch."""
    return _lin(att.w, torch.tanh(_lin(att.V[0], h)) * torch.sigmoid(_lin(att.U[0], h)))


def _softmax_over_tiles(s):
    e = torch.exp(s - s.max(0).values)
    return e / e.sum(0)


@pytest.mark.parametrize("name", ["abmil", "clam_sb"])
def test_gated_attention_pooling_is_ilse_written_out(name):
    """ABMIL / CLAM-SB: h = ReLU(W x + b); a = softmax over the tiles of the gated score; z = sum_i a_i h_i;
    logits = classifier(z). A gate dropped (tanh only) or a mean instead of the attention-weighted sum fails."""
    torch.manual_seed(0)
    m = build_model(name, 6, 3, hidden=8, attn_dim=5).eval()
    x = torch.randn(13, 6)
    with torch.no_grad():
        out = m(x)
        h = torch.relu(_lin(m.fc[0], x))
        a = _softmax_over_tiles(_gated_scores(m.attention, h))[:, 0]
        logits = _lin(m.classifier, a @ h)
    torch.testing.assert_close(out["attention"], a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["instance_scores"], a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["logits"], logits, rtol=1e-5, atol=1e-6)


def test_clam_mb_binary_shows_the_tumour_branch_and_scores_each_class_with_its_own_branch():
    """CLAM-MB (Lu et al. 2021): one gated-attention branch per class, softmax over the tiles in each; class c's logit
    is its own classifier on its own branch's pooled feature. Binary heatmaps show class 1's (tumour) branch."""
    torch.manual_seed(1)
    m = build_model("clam_mb", 6, 2, hidden=8, attn_dim=5).eval()
    x = torch.randn(11, 6)
    with torch.no_grad():
        out = m(x)
        h = torch.relu(_lin(m.fc[0], x))
        A = _softmax_over_tiles(_gated_scores(m.attention, h))  # [N, 2]
        logits = torch.stack([_lin(m.classifiers[c], A[:, c] @ h)[0] for c in range(2)])
    torch.testing.assert_close(out["logits"], logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["attention"], A[:, 1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(A[:, 0], A[:, 1])  # the two branches differ: the test can tell which one is shown


def test_transmil_class_token_attention_is_the_scaled_softmax_row_averaged_over_heads():
    """The heatmap attention of TransMIL: the class token's row of softmax(q k^T / sqrt(d_head)) in the last layer,
    averaged over the heads, a padded copy's weight added to its tile (7 tiles -> a 3 x 3 square: tiles 0 and 1
    twice), normalised to sum 1. Written out from the last layer's input and weights."""
    torch.manual_seed(0)
    heads, d, n = 2, 8, 7
    m = build_model("transmil", 6, 2, hidden=d, heads=heads).eval()
    x = torch.randn(n, 6)
    seen = {}
    m.layers[-1].register_forward_pre_hook(lambda mod, args: seen.update(t=args[0].detach().clone()))
    with torch.no_grad():
        got = m(x)["attention"]
        t = seen["t"]
        assert t.shape == (1 + 9, d)  # class token + a 3 x 3 square
        sa = m.layers[-1]
        q, k, _ = _lin(sa.qkv, F.layer_norm(t, (d,), sa.norm.weight, sa.norm.bias)).chunk(3, dim=1)
        dh = d // heads
        rows = [torch.softmax(q[0, j * dh:(j + 1) * dh] @ k[:, j * dh:(j + 1) * dh].T / math.sqrt(dh), 0)
                for j in range(heads)]
        raw = torch.stack(rows).mean(0)[1:]  # [9] over the square's tokens
        want = raw[:n].clone()
        want[:2] += raw[n:]
        want = want / want.sum()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_binary_pooling_tile_score_is_the_positive_logit_margin():
    """mean / max pooling, two classes: a tile's score is logit_1 - logit_0 of that tile; for mean pooling the mean
    of the tile margins is the slide's margin (pooling is linear)."""
    torch.manual_seed(0)
    m = build_model("mean", 6, 2, hidden=8).eval()
    x = torch.randn(10, 6)
    with torch.no_grad():
        out = m(x)
        inst = _lin(m.classifier, torch.relu(_lin(m.fc[0], x)))
    torch.testing.assert_close(out["instance_scores"], inst[:, 1] - inst[:, 0], rtol=1e-5, atol=1e-6)
    assert float(out["instance_scores"].mean()) == pytest.approx(float(out["logits"][1] - out["logits"][0]), abs=1e-5)


def test_class_weights_are_sklearns_balanced_weights():
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0] * 7 + [1] * 2 + [2] * 3)
    want = compute_class_weight("balanced", classes=np.arange(3), y=y)  # n / (C * n_c)
    np.testing.assert_allclose(class_weights(y, 3).numpy(), want, rtol=1e-6)


def _bags(n, d=6, seed=0):
    r = np.random.default_rng(seed)
    return [torch.from_numpy(r.normal(size=(int(r.integers(6, 12)), d)).astype(np.float32)) for _ in range(n)]


def test_clam_training_loss_is_the_class_weighted_bag_loss_mixed_with_the_instance_loss():
    """With lr 0 the weights never move, so each epoch's train_loss is the mean over the bags of
    ``bag_weight * w_y * CE(logits, y) + (1 - bag_weight) * instance_loss`` at the initial weights, with w the
    balanced class weights (sklearn's): recomputed here from a model built with the same seed."""
    from sklearn.utils.class_weight import compute_class_weight

    bags, y = _bags(6), np.array([0, 0, 0, 0, 1, 1])
    cfg = TrainConfig(model="clam_sb", epochs=1, lr=0.0, weight_decay=0.0, hidden=8, dropout=0.0, bag_weight=0.3,
                      standardize=False, seed=5, model_kwargs={"k_sample": 2})
    _, info = train_fold(bags, y, [], np.array([], int), 6, 2, cfg)
    w = compute_class_weight("balanced", classes=np.arange(2), y=y)
    torch.manual_seed(5)
    m = build_model("clam_sb", 6, 2, hidden=8, dropout=0.0, k_sample=2).train()
    with torch.no_grad():
        losses = []
        for b, lab in zip(bags, y):
            out = m(b, label=int(lab))
            ce = float(F.cross_entropy(out["logits"][None], torch.tensor([int(lab)])))
            losses.append(0.3 * w[lab] * ce + 0.7 * float(out["instance_loss"]))
    assert info["history"][0]["train_loss"] == pytest.approx(np.mean(losses), rel=1e-5)


def test_the_kept_epoch_has_the_lowest_validation_loss_and_the_model_returned_is_that_epochs():
    """monitor=loss keeps the epoch of least validation loss (the first of equals); the model returned scores that
    loss again (log loss recomputed with sklearn from its predictions)."""
    from sklearn.metrics import log_loss

    r = np.random.default_rng(0)
    bags, y = _bags(24, seed=1), np.array([0, 1] * 12)
    for b, lab in zip(bags, y):
        b[:, 0] += 1.5 * float(lab) + float(r.normal())  # a weak, noisy signal: the validation loss goes up and down
    cfg = TrainConfig(model="abmil", epochs=8, patience=8, lr=2e-2, hidden=8, seed=0)
    model, info = train_fold(bags[:16], y[:16], bags[16:], y[16:], 6, 2, cfg)
    vl = [h["val_loss"] for h in info["history"]]
    assert len(set(np.round(vl, 6))) > 2 and int(np.argmin(vl)) != len(vl) - 1  # not simply the last epoch
    assert info["best_epoch"] == int(np.argmin(vl))
    probs, _ = predict(model, bags[16:])
    assert log_loss(y[16:], probs, labels=[0, 1]) == pytest.approx(min(vl), rel=1e-4)


@pytest.mark.parametrize("patience,min_epochs,want", [(1, 5, 5), (2, 1, 3), (1, 1, 2), (3, 2, 4)])
def test_early_stopping_counts_patience_and_min_epochs(patience, min_epochs, want):
    """lr 0: the validation loss never improves after epoch 0, so training stops after ``patience`` epochs without
    improvement (epoch ``patience``, i.e. patience + 1 epochs run), but not before ``min_epochs`` epochs."""
    bags, y = _bags(8, seed=2), np.array([0, 1] * 4)
    cfg = TrainConfig(model="abmil", epochs=10, patience=patience, min_epochs=min_epochs, lr=0.0, weight_decay=0.0,
                      hidden=8, dropout=0.0, seed=0)
    _, info = train_fold(bags[:6], y[:6], bags[6:], y[6:], 6, 2, cfg)
    assert info["epochs_run"] == want and info["best_epoch"] == 0


def test_max_tiles_gives_the_model_a_subset_in_file_order_with_its_own_cells(monkeypatch):
    """A bag over ``max_tiles`` is cut to that many distinct tiles kept in file order (TransMIL's PPEG reads the
    order as the layout), with the grid cells of those same tiles."""
    from gigaslide.mil import train as T

    seen = []
    real = T.build_model

    def spy_build(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        inner = real(*a, **kw)

        class Spy(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, bag, label=None, cells=None):  # noqa: ANN001, ANN202
                if self.training:
                    seen.append((bag[:, 0].detach().clone(), None if cells is None else cells.clone()))
                return self.inner(bag, label=label, cells=cells)

        return Spy()

    monkeypatch.setattr(T, "build_model", spy_build)
    n = 40
    bags = []
    for s in range(4):
        b = torch.randn(n, 6)
        b[:, 0] = torch.arange(n, dtype=torch.float32)  # feature 0 = the tile's index in the file
        bags.append(b)
    cells = [np.stack([np.arange(n) % 8, np.arange(n) // 8], 1) for _ in bags]
    cfg = TrainConfig(model="abmil", epochs=2, max_tiles=12, standardize=False, hidden=8, seed=0)
    train_fold(bags, np.array([0, 1, 0, 1]), [], np.array([], int), 6, 2, cfg, cells_tr=cells)
    assert len(seen) == 8
    for f0, c in seen:
        idx = f0.long()
        assert len(idx) == 12 and len(set(idx.tolist())) == 12 and bool((idx[1:] > idx[:-1]).all())
        assert c is not None and torch.equal(c, torch.from_numpy(cells[0])[idx])


def test_a_tile_is_tumour_where_its_centre_lies_not_its_corner():
    """Ground-truth cells of 96 px (tumour at cells (1, 0) and (0, 1)); a tile is tumour when its centre (top-left
    + half its own level-0 side) is in a tumour cell. Tiles straddling two cells tell centre from corner, and a tile
    of 48 px from one of the cells' 96 px."""
    from gigaslide.mil.mosaic import tumor_labels_for_coords

    gt = np.array([[0, 0, 96, 0], [96, 0, 96, 1], [0, 96, 96, 1], [96, 96, 96, 0]])
    coords = np.array([[60, 0], [0, 60], [60, 60], [20, 20]])
    # centres (108, 48) -> cell (1, 0); (48, 108) -> (0, 1); (108, 108) -> (1, 1); (68, 68) -> (0, 0)
    assert tumor_labels_for_coords(gt, coords, 96).tolist() == [1, 1, 0, 0]
    # 48 px tiles: (60, 0) has its centre at (84, 24), in cell (0, 0); (100, 100) at (124, 124), in (1, 1)
    assert tumor_labels_for_coords(gt, np.array([[60, 0], [60, 60], [40, 110]]), 48).tolist() == [0, 0, 1]


def test_standardisation_is_sklearns_standard_scaler_over_the_training_tiles():
    """Features are z-scored with the training fold's per-dimension tile mean and (population) std, as sklearn's
    StandardScaler fitted on all training tiles gives them, and the model sees exactly those z-scores."""
    from sklearn.preprocessing import StandardScaler

    r = np.random.default_rng(3)
    bags = [torch.from_numpy((r.normal(size=(int(r.integers(5, 15)), 6)) * [1, 2, 3, 4, 5, 6] + 7).astype(np.float32))
            for _ in range(6)]
    cfg = TrainConfig(model="abmil", epochs=1, hidden=8, seed=0)
    model, _ = train_fold(bags, np.array([0, 1] * 3), [], np.array([], int), 6, 2, cfg)
    sc = StandardScaler().fit(np.concatenate([b.numpy() for b in bags]).astype(np.float64))
    np.testing.assert_allclose(model.mean.numpy().ravel(), sc.mean_, rtol=1e-5)
    np.testing.assert_allclose(model.std.numpy().ravel(), sc.scale_, rtol=1e-5)
    test = torch.randn(9, 6) * 3 + 7
    with torch.no_grad():
        want = model.mil(torch.from_numpy(sc.transform(test.numpy().astype(np.float64)).astype(np.float32)))
        got = model(test)
    torch.testing.assert_close(got["logits"], want["logits"], rtol=1e-4, atol=1e-5)


def test_cv_trains_and_validates_on_slides_of_other_patients_than_the_test_fold(tmp_path, monkeypatch):
    """What run_cv hands to training, read at the call (not from splits.json, which is written from the same
    variables): the training and validation slides of a fold share no patient with its test slides or with each
    other, the three cover the cohort, and they are the ones splits.json records."""
    import json

    from gigaslide.features import store
    from gigaslide.mil import cv

    r = np.random.default_rng(0)
    rows = ["slide_id,patient_id,label"]
    for i in range(24):
        y = i % 2
        store.save(tmp_path / "f" / f"s{i}.h5", r.normal(size=(6, 4)).astype(np.float32) + y,
                   r.integers(0, 900, (6, 2)), attrs={"encoder": "toy", "slide_id": f"s{i}"})
        rows.append(f"s{i},p{i // 4 * 2 + y},{y}")  # two slides per patient
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    calls = []
    real = cv.train_fold

    def spy(bags_tr, y_tr, bags_va, y_va, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(([str(bags_tr.path(i).stem) for i in range(len(bags_tr))],
                      [str(bags_va.path(i).stem) for i in range(len(bags_va))]))
        return real(bags_tr, y_tr, bags_va, y_va, *a, **kw)

    monkeypatch.setattr(cv, "train_fold", spy)
    cv.run_cv(tmp_path / "f", tmp_path / "labels.csv", tmp_path / "run", folds=3, n_bootstrap=10, verbose=False,
              cfg=TrainConfig(model="mean", epochs=1, hidden=4))
    patient = {f"s{i}": f"p{i // 4 * 2 + i % 2}" for i in range(24)}
    rec = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert len(calls) == 3
    for (tr, va), fold, name in zip(calls, rec["folds"], ["fold0", "fold1", "fold2"]):
        te = fold["test"]
        pt, pv, pe = ({patient[s] for s in part} for part in (tr, va, te))
        assert va and not (pt & pe) and not (pv & pe) and not (pt & pv)
        assert sorted(tr + va + te) == sorted(patient)
        assert (tr, va) == (rec["per_fold"][name]["train"], rec["per_fold"][name]["val"])
