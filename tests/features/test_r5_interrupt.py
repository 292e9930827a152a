"""Ctrl-C during ``gigaslide encode`` with a reader process: one line, exit 130, no traceback of a reader (review
round 5). Ctrl-C reaches the terminal's whole process group, the reader processes too."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from gigaslide.testing import make_slide

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job inherits SIG_IGN)
    import gigaslide.features.extract as ex
    from gigaslide.cli.main import main
    real = ex.choose_precision

    def ctrl_c(*a, **k):  # at the first batch: the reader process is running, batches are in flight
        os.killpg(os.getpgid(0), signal.SIGINT)
        time.sleep(5)
        return real(*a, **k)

    ex.choose_precision = ctrl_c
    sys.exit(main(["encode", sys.argv[1], "--out", sys.argv[2], "--encoder", "test_resnet", "--weights", "random",
                   "--mpp", "1", "--tile-size", "32", "--batch-size", "2", "--workers", "1", "--threads", "1",
                   "--precision", "fp32", "--tile-workers", "1"]))
""")


def test_ctrl_c_with_a_reader_process_is_one_line(tmp_path):
    slide = make_slide(tmp_path / "a.tiff", (768, 768), seed=1)
    p = subprocess.run([sys.executable, "-c", CHILD, str(slide), str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=120, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 130, p.stderr
    assert "interrupted; finished outputs are kept" in p.stderr
    assert "Traceback" not in p.stderr and "KeyboardInterrupt" not in p.stderr, p.stderr
    assert not (tmp_path / "out" / "features" / "a.h5").exists()
