"""`course_utils.saliency_checks`: notebook 01's cached experiments."""
from __future__ import annotations

import pytest
import torch

from course_utils import saliency_checks as SC
from tests.conftest import asset_or_skip


def test_budget_has_every_tier_and_refuses_others():
    for tier in ("ci", "laptop", "full"):
        b = SC.budget(tier)
        assert set(b) >= {"photos", "granularity", "fractions", "n_train", "epochs", "augment", "n_maps"}
        assert b["fractions"][0] == 0 and b["fractions"][-1] == 1
    assert SC.budget("laptop")["augment"] is False  # memorising needs no augmentation
    with pytest.raises(ValueError, match="tier must be"):
        SC.budget("gpu")


def test_data_randomization_maps_of_a_net_with_itself_agree():
    from course_utils.train import make_cifar_net

    torch.manual_seed(0)
    net = make_cifar_net(10, width=(8, 16, 16)).eval()
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(6) % 10
    out = SC.data_randomization_maps(net, net, x, y)
    assert out["cam_true"].shape == out["gb_perm"].shape == (6, 32, 32)
    finite = out["rho_cam"].isfinite()
    torch.testing.assert_close(out["rho_cam"][finite], torch.ones(int(finite.sum()), dtype=torch.float64))
    torch.testing.assert_close(out["rho_gb"], torch.ones(6, dtype=torch.float64))


def test_model_randomization_on_the_cat_and_dog_photo_is_cached(tmp_path, monkeypatch):
    asset_or_skip("images/both.png")
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path))
    out = SC.model_randomization(["both"], "coarse", progress=False)
    assert out["steps"] == ["trained", "logits", "head", "stage 7", "stages 6-5", "stages 4-3", "stages 2-1", "stem"]
    assert out["labels"] == ["both: tiger cat", "both: bull mastiff"]
    assert out["rho_cam"].shape == out["rho_gb"].shape == (8, 2)
    torch.testing.assert_close(out["rho_cam"][0], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(out["cam"][0], out["cam0"][1])  # the pictures follow the dog
    from course_utils import cache

    assert len(cache.entries(name="gradcam_model_randomization")) == 1
    again = SC.model_randomization(["both"], "coarse", progress=False)  # loaded from the cache
    torch.testing.assert_close(again["rho_gb"], out["rho_gb"], equal_nan=True)


def test_the_notebook_s_precompute_recipe_is_registered():
    from course_utils import cache

    assert any(r.name == "01_gradcam" and r.function is SC.precompute_01 for r in cache.recipes())
