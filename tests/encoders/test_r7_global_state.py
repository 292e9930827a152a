"""Review round 7: building an encoder leaves the caller's torch random stream as it was."""

from __future__ import annotations

import torch

from gigaslide.encoders import build_encoder


def test_build_encoder_does_not_reset_the_callers_torch_random_stream():
    """``build_encoder`` called ``torch.manual_seed(seed)``: a notebook's ``torch.manual_seed(123)`` stream restarted
    from seed 0 after it (and the CUDA generators were seeded too). The random weights stay a function of ``seed``."""
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    a = build_encoder("test_resnet", "random", seed=0)
    assert torch.equal(torch.rand(4), want)
    b = build_encoder("test_resnet", "random", seed=0)
    c = build_encoder("test_resnet", "random", seed=1)
    pa, pb, pc = (torch.cat([p.flatten() for p in e.parameters()]) for e in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_an_encoder_export_from_a_newer_gigaslide_is_refused_in_one_line(tmp_path):
    """``encoder.json`` of a newer format loaded with the keys this version does not know dropped silently (the
    encoder then ran with other settings than it was exported with); feature files and grids were already refused."""
    import json

    import pytest

    from gigaslide.encoders import export_encoder
    from gigaslide.errors import GigaslideError
    from gigaslide.provenance import provenance

    enc = build_encoder("test_resnet", "random", seed=0)
    export_encoder(tmp_path / "exp", enc.trunk, enc.spec, provenance=provenance(kind="encoder", seed=0))
    assert build_encoder(str(tmp_path / "exp")).spec.name == enc.spec.name  # this version's export loads
    spec = tmp_path / "exp" / "encoder.json"
    d = json.loads(spec.read_text())
    d["provenance"]["format_version"] = 99
    d["future_key"] = "changes what the encoder means"
    spec.write_text(json.dumps(d))
    with pytest.raises(GigaslideError, match="format version 99") as e:
        build_encoder(str(tmp_path / "exp"))
    assert "encoder.json" in str(e.value) and "\n" not in str(e.value)
