"""``eval.precise_bn_batches`` in a real run: both accuracies recorded, training untouched."""

from __future__ import annotations

import pytest
import torch

from tests.cli import bnlab, metrics, scalars, tiny


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["custom", "dbn", "evonorm_b0"])
def test_precise_bn_records_both_accuracies_and_trains_identically(tmp_path, cifar_root, norm):
    runs = {}
    for batches in (0, 3):
        run_dir = tmp_path / f"precise{batches}"
        r = bnlab("train", *tiny(cifar_root, "probe=off", f"norm={norm}", "norm.group_size=4"
                                 if norm == "dbn" else "norm.eps=1e-5", "model.dropout=0.3",
                                 f"eval.precise_bn_batches={batches}",
                                 f"hydra.run.dir={run_dir}"), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        runs[batches] = run_dir
    plain, precise = metrics(runs[0]), metrics(runs[3])
    assert plain["final_test_acc_precise_bn"] is None
    assert [h["test_acc"] for h in precise["history"]] == [h["test_acc"] for h in
                                                          plain["history"]]
    accs = [h["test_acc_precise_bn"] for h in precise["history"]]
    assert len(accs) == 2 and all(0 <= a <= 1 for a in accs)
    assert precise["final_test_acc_precise_bn"] == accs[-1]
    assert [v for _, v in scalars(runs[3])["test/acc_precise_bn"]] == pytest.approx(accs)
    a = torch.load(runs[0] / "checkpoint.pt", weights_only=True)
    b = torch.load(runs[3] / "checkpoint.pt", weights_only=True)
    for key, value in a["model"].items():  # weights and running statistics, bit for bit
        assert torch.equal(value, b["model"][key]), key
    assert torch.equal(a["rng"]["cpu"], b["rng"]["cpu"])
