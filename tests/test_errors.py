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
