"""Round 8, mutation testing of the pretrain-slides command: every option given on the command line reaches the run
(run.json records what the run trains with; an option dropped between the CLI and the trainer trained the default)."""
from gigaslide import runs
from gigaslide.cli.main import main


def test_gigassl_options_reach_the_run(tmp_path, make_fake_cache):
    cache = make_fake_cache(tmp_path / "c", n_slides=4)
    args = ["--temperature", "0.2", "--out-dim", "8", "--width", "12", "--blocks", "1", "--norm", "layer",
            "--downsample", "false", "--tiles-per-step", "3", "--grid-augment", "false", "--warmup-epochs", "0",
            "--select", "last", "--patience", "3", "--seed", "4", "--epochs", "1", "--batch-size", "3", "--lr", "0.01"]
    assert main(["pretrain-slides", "--method", "gigassl", "--cache", str(cache), "--out", str(tmp_path / "r"),
                 "--encoder", "sparseconvmil", "--device", "cpu", *args]) == 0
    train = runs.read_run(tmp_path / "r")["config"]["train"]
    want = dict(temperature=0.2, out_dim=8, hidden=12, blocks=1, norm="layer", downsample=False, tiles_per_step=3,
                grid_augment=False, warmup_epochs=0, select="last", patience=3, seed=4, epochs=1, batch_size=3, lr=0.01)
    assert {k: train[k] for k in want} == want


def test_slpd_options_reach_the_run(tmp_path, make_fake_cache):
    feats = make_fake_cache(tmp_path / "f", n_slides=3, n_tiles=36)
    args = ["--region-size", "256", "--region-mpp", "0.5", "--prototypes", "1", "--losses", "dino+intra",
            "--warmup", "2", "--head-dim", "32", "--n-local", "3", "--teacher-temp", "0.05", "--seed", "2",
            "--epochs", "1", "--batch-size", "8", "--lr", "0.001"]
    assert main(["pretrain-slides", "--method", "slpd", "--features", str(feats), "--out", str(tmp_path / "r"),
                 "--device", "cpu", *args]) == 0
    train = runs.read_run(tmp_path / "r")["config"]["train"]
    want = dict(region_size=256, region_mpp=0.5, prototypes=1, losses="dino+intra", warmup=2, head_dim=32, n_local=3,
                teacher_temp=0.05, seed=2, epochs=1, batch_size=8, lr=0.001)
    assert {k: train[k] for k in want} == want
