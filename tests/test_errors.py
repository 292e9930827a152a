import pytest
import torch

from gigaslide.errors import GigaslideError, check_finite_loss


def test_one_line_names_path_and_fix():
    e = GigaslideError("cannot open\nslide", path="/x/a.svs", fix="re-export it")
    assert e.one_line() == "/x/a.svs: cannot open slide -- fix: re-export it"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), torch.tensor(float("-inf"))])
def test_non_finite_loss_stops_the_run_with_a_resumable_message(bad, tmp_path):
    with pytest.raises(GigaslideError, match="loss became .* at step 7") as e:
        check_finite_loss(bad, "step 7", tmp_path)
    assert str(tmp_path) in e.value.one_line() and "resumes" in e.value.one_line()


def test_finite_loss_passes():
    check_finite_loss(torch.tensor(1.5), "step 1", "run")


def test_check_finite_weights_names_the_first_bad_tensor_buffers_included(tmp_path):
    import torch

    from gigaslide.errors import check_finite_weights

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    check_finite_weights(model, "step 3", tmp_path)  # finite: passes
    with torch.no_grad():
        model[1].running_var[1] = float("inf")  # a buffer, not a parameter: eval-mode outputs become NaN
    with pytest.raises(GigaslideError, match=r"1 weight tensor\(s\) became NaN/inf by step 3 \(the first: "
                                             r"1\.running_var\); no checkpoint was written"):
        check_finite_weights(model, "step 3", tmp_path)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(GigaslideError, match=r"2 weight tensor\(s\).*the first: 0\.weight.*fix: use fp32"):
        check_finite_weights(model.state_dict(), "step 4", tmp_path, fix="use fp32")


def test_nonfinite_weights_lists_every_bad_tensor_in_order():
    import torch

    from gigaslide.errors import nonfinite_weights

    sd = {"a": torch.ones(2), "b": torch.tensor([1.0, float("-inf")]), "n": torch.tensor([3]),
          "c": torch.full((1,), float("nan"))}
    assert nonfinite_weights(sd) == ["b", "c"]  # integer tensors are not weights
