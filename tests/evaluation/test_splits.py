import numpy as np
import pytest

from gigaslide.errors import GigaslideError
from gigaslide.evaluation import splits as S


def _csv(tmp_path, text, name="labels.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _table(n=40, patients=20, seed=0):
    r = np.random.default_rng(seed)
    pat = [f"p{i % patients}" for i in range(n)]
    lab = {f"p{i}": int(r.integers(0, 2)) for i in range(patients)}
    lab["p0"], lab["p1"] = 0, 1
    return "slide_id,patient_id,label\n" + "".join(f"s{i},{pat[i]},{lab[pat[i]]}\n" for i in range(n))


def test_read_labels_ok(tmp_path):
    t = S.read_labels(_csv(tmp_path, _table()))
    assert len(t) == 40 and t.has_patients and t.n_classes == 2
    t2 = S.read_labels(_csv(tmp_path, "slide_id,label\na,0\nb,1\n", "l2.csv"))
    assert t2.patient_ids == ["a", "b"] and not t2.has_patients


@pytest.mark.parametrize("text,needle", [
    ("slide_id,label\na,0\na,1\n", "duplicate slide_id"),
    ("slide_id,label\na,0\nb,tumor\n", "non-numeric"),
    ("slide_id,label\na,1\nb,1\n", "only 1 class"),
    ("slide,label\na,0\n", "missing column"),
    ("slide_id,label\n", "no rows"),
    ("slide_id,label\na,0\nb,2\n", "not 0..1"),
    ("slide_id,label\na,0\nb,0.5\n", "non-numeric or invalid"),
    # a row with more fields than the header (an unquoted comma): one line naming the line, not an AttributeError
    ("slide_id,label\na,0\nb,1,extra\n", r"line 3 has 3 fields, the header 2 \(slide_id, label\)"),
    # the line of the file, counting the blank lines csv skips
    ("slide_id,label\na,0\n\n\nb,1\n,1\n", r"empty slide_id on line\(s\) 6"),
])
def test_read_labels_errors(tmp_path, text, needle):
    with pytest.raises(GigaslideError, match=needle) as e:
        S.read_labels(_csv(tmp_path, text))
    assert "fix:" in str(e.value) and "labels.csv" in str(e.value)


def test_labels_and_predictions_that_are_not_utf8_are_one_line(tmp_path):
    """Excel's cp1252 CSV (patient José): one line naming the file and the fix (was a UnicodeDecodeError traceback),
    for labels and for prediction files alike."""
    from gigaslide.evaluation.slides import read_predictions

    p = tmp_path / "labels.csv"
    p.write_bytes("slide_id,patient_id,label\na,Jos\xe9,0\nb,Ren\xe9e,1\n".encode("cp1252"))
    with pytest.raises(GigaslideError, match=r"labels\.csv: not UTF-8 text \(byte 0xe9 at offset 31\).*UTF-8"):
        S.read_labels(p)
    q = tmp_path / "predictions.csv"
    q.write_bytes("slide_id,label,prob_0,prob_1,fold\nJos\xe9,0,0.9,0.1,0\nb,1,0.2,0.8,0\n".encode("cp1252"))
    with pytest.raises(GigaslideError, match=r"predictions\.csv: not UTF-8 text"):
        read_predictions(q)
    p.write_bytes("slide_id,patient_id,label\na,Jos\xe9,0\nb,Ren\xe9e,1\n".encode("utf-8"))
    assert S.read_labels(p).patient_ids == ["Jos\xe9", "Ren\xe9e"]


def test_match_features_reports_missing_and_unknown(tmp_path):
    t = S.read_labels(_csv(tmp_path, "slide_id,label\na,0\nb,1\nc,1\nd,0\n"))
    with pytest.raises(GigaslideError, match="1 labeled slide\\(s\\) have no features: d.*1 feature file\\(s\\) have no label: z"):
        S.match_features(t, {"a", "b", "c", "z"})
    m = S.match_features(t, {"a", "b", "c", "z"}, on_missing="skip")
    assert m.table.slide_ids == ["a", "b", "c"] and m.skipped_missing == ["d"] and m.skipped_unlabeled == ["z"]
    with pytest.raises(GigaslideError, match="only one class"):
        S.match_features(t, {"b", "c"}, on_missing="skip")


def test_folds_grouped_stratified_deterministic(tmp_path):
    t = S.read_labels(_csv(tmp_path, _table(60, 30)))
    f1 = S.make_folds(t.labels, t.patient_ids, 5, seed=3)
    f2 = S.make_folds(t.labels, t.patient_ids, 5, seed=3)
    assert all((a[1] == b[1]).all() for a, b in zip(f1, f2))
    test_all = np.concatenate([te for _, te in f1])
    assert sorted(test_all) == list(range(60))
    pats = np.array(t.patient_ids)
    for tr, te in f1:
        assert not set(pats[tr]) & set(pats[te])
        assert len(np.unique(t.labels[te])) == 2
        trn, val = S.validation_split(tr, t.labels, t.patient_ids, fraction=0.2, seed=0)
        assert len(val) > 0 and not set(pats[trn]) & set(pats[val]) and set(trn) | set(val) == set(tr)
        assert not set(val) & set(te)
    f3 = S.make_folds(t.labels, t.patient_ids, 5, seed=4)
    as_partition = lambda folds: sorted(tuple(sorted(te.tolist())) for _, te in folds)  # noqa: E731
    assert as_partition(f3) != as_partition(f1)  # another seed, another partition of the slides
    assert as_partition(S.make_folds(t.labels, t.patient_ids, 5, seed=3)) == as_partition(f1)  # same seed, same one


def test_too_many_folds_error():
    y = np.array([0, 0, 0, 1, 1])
    with pytest.raises(GigaslideError, match="class 1 has only 2.*use --folds 2 or fewer"):
        S.make_folds(y, None, 3)
    with pytest.raises(GigaslideError, match="class 1 has only 1.*needs at least 2 .* per class") as e:
        S.make_folds(np.array([0, 0, 0, 1]), None, 2)
    assert "--folds 2 or fewer" not in str(e.value)  # the value that just failed is not offered as the fix


def test_few_shot_draws():
    y = np.repeat([0, 1], [80, 20])
    idx = np.arange(100)
    d = S.few_shot_draws(idx, y, 25, repeats=4, seed=0)
    assert len(d) == 4 and all(len(x) == 25 and len(set(x)) == 25 for x in d)
    assert all(set(y[x]) == {0, 1} for x in d)
    assert not all((d[0] == x).all() for x in d[1:])
    assert (S.few_shot_draws(idx, y, 25, 4, seed=0)[2] == d[2]).all()
    assert len(S.few_shot_draws(idx, y, 500, 2)[0]) == 100


def test_clams_case_id_column_groups_the_folds(tmp_path):
    """CLAM / TCGA label CSVs name the patient case_id: it was ignored, and the two slides of a case were split
    between a training and a test fold (sl02 tested, sl03 trained on in the same fold)."""
    p = tmp_path / "labels.csv"
    p.write_text("case_id,slide_id,label\n" + "".join(f"P{i // 2},sl{i:02d},{i // 2 % 2}\n" for i in range(24)))
    t = S.read_labels(p)
    assert t.has_patients and t.patient_ids[:3] == ["P0", "P0", "P1"]
    for tr, te in S.make_folds(t.labels, t.patient_ids, 3, seed=0):
        assert not {t.patient_ids[i] for i in tr} & {t.patient_ids[i] for i in te}
    p.write_text("case_id,slide_id,patient_id,label\nc1,a,p1,0\nc1,b,p2,1\n")  # patient_id wins where both are given
    assert S.read_labels(p).patient_ids == ["p1", "p2"]


def test_read_labels_with_class_names(tmp_path):
    """CLAM / TCGA label columns hold class names: mapped to 0..C-1 in sorted order, the names kept on the table, the
    subset (slides matched to features) and the splits record; numeric labels have no names."""
    text = "case_id,slide_id,label\nc1,a,LUSC\nc1,b,LUSC\nc2,c,LUAD\nc3,d,MESO\nc4,e,LUAD\n"
    t = S.read_labels(_csv(tmp_path, text))
    assert t.class_names == ["LUAD", "LUSC", "MESO"] and t.labels.tolist() == [1, 1, 0, 2, 0]
    assert t.patient_ids == ["c1", "c1", "c2", "c3", "c4"] and t.n_classes == 3
    sub = S.match_features(t, ["a", "c", "e"], on_missing="skip").table  # MESO has no features: still class 2
    assert sub.class_names == t.class_names and sub.labels.tolist() == [1, 0, 0] and sub.n_classes == 3
    folds = S.make_folds(np.array([0, 1] * 4), None, 2)
    rec = S.splits_record(S.read_labels(_csv(tmp_path, "slide_id,label\n" + "".join(
        f"s{i},{'tumor_tissue' if i % 2 else 'normal_tissue'}\n" for i in range(8)), "l2.csv")), folds)
    assert rec["class_names"] == ["normal_tissue", "tumor_tissue"]
    assert S.read_labels(_csv(tmp_path, "slide_id,label\na,0\nb,1\n", "l3.csv")).class_names is None
    assert "class_names" not in S.splits_record(S.read_labels(tmp_path / "l3.csv"), [])


@pytest.mark.parametrize("text,needle", [
    ("slide_id,label\na,0\nb,tumor\nc,normal\n", r"mixes numbers \(a='0'\) and non-numeric class names "
                                                 r"\(b='tumor', c='normal'\)"),
    ("slide_id,label\na,Tumor\nb,tumor\nc,normal\n", r"differ only by case or spaces: 'Tumor' / 'tumor'"),
    ("slide_id,label\na,tumor tissue\nb,tumor  tissue\nc,normal\n", r"differ only by case or spaces"),
    ("slide_id,label\na,tumor\nb,\nc,normal\n", r"missing label on slide\(s\) b=''"),
    # pandas / R's missing value: not a class of its own
    ("slide_id,label\na,tumor\nb,NA\nc,normal\nd,nan\n", r"missing label on slide\(s\) b='NA', d='nan'"),
])
def test_read_labels_class_name_errors(tmp_path, text, needle):
    with pytest.raises(GigaslideError, match=needle) as e:
        S.read_labels(_csv(tmp_path, text))
    assert "fix:" in str(e.value) and "labels.csv" in str(e.value) and "\n" not in str(e.value)


def test_make_folds_names_the_short_class(tmp_path):
    y = np.array([0] * 6 + [1] * 2)
    with pytest.raises(GigaslideError, match=r"class 1 \(tumor\) has only 2 .*add slides of class 1 \(tumor\)"):
        S.make_folds(y, None, 3, class_names=["normal", "tumor"])


def test_slide_ids_with_the_slide_extension_are_named(tmp_path):
    """A CLAM process list's slide_id keeps the extension (s1.svs): the message says so (was: every slide has no
    features and every feature file no label, fix --on-missing skip -- which then found no slide)."""
    t = S.read_labels(_csv(tmp_path, "case_id,slide_id,label\nc1,s1.svs,0\nc2,s2.svs,1\nc3,s3,0\n"))
    for mode in ("error", "skip"):
        with pytest.raises(GigaslideError, match=r"2 slide_id\(s\) name a feature file once their extension is "
                                                 r"dropped \(s1.svs -> s1.h5\).*without the slide file's extension"):
            S.match_features(t, ["s1", "s2", "s3"], on_missing=mode)
    assert S.match_features(t, ["s1.svs", "s2.svs", "s3"]).table.slide_ids == ["s1.svs", "s2.svs", "s3"]
