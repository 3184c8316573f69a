"""Issue 20, item 8: the baselines take their own official recipes where they ran on the dataset.

SRe2L ``small_dataset/recover_tiny.sh``: ``--r-bn 1``; CDA ``README.md`` (Tiny): ``--lr 0.4``; LPLD's own Tiny
recipe (``tiny_recover.sh``: ``--r-bn 0.05 --lr 0.1``) stays LPLD's. The ImageNet-21K statistics pass uses batch 1024
(paper Table 16). Precedence: ``recover.<key>`` > ``recipe.recover_by_method.<method>`` > ipc_table > recipe.
"""

from __future__ import annotations

import pytest
from conftest import compose_cfg


def _rec(*o: str):
    from lpld.config import recover_settings

    return recover_settings(compose_cfg(["model=resnet18", "ipc=10", *o]))


@pytest.mark.parametrize(
    "overrides,alpha,lr",
    [
        (("dataset=tiny", "recover=sre2l"), 1.0, 0.1),  # SRe2L's Tiny script
        (("dataset=tiny", "recover=cda"), 0.05, 0.4),  # CDA's Tiny command
        (("dataset=tiny",), 0.05, 0.1),  # LPLD keeps LPLD's Tiny recipe
        (("dataset=tiny", "recover=lpld_c"), 0.05, 0.1),
        (("dataset=in1k", "recover=sre2l"), 0.01, 0.25),  # no 1K entry: the 1K recipe
        (("dataset=in1k", "recover=cda"), 0.01, 0.25),
        (("dataset=tiny", "recover=sre2l", "recover.alpha=0.05"), 0.05, 0.1),  # the switch: command line wins
        (("dataset=tiny", "recover=cda", "recover.lr=0.1"), 0.05, 0.1),
    ],
)
def test_recover_alpha_and_lr(overrides, alpha, lr):
    s = _rec(*overrides)
    assert (s["alpha"], s["lr"]) == (pytest.approx(alpha), pytest.approx(lr))


def test_method_entries_are_checked_against_the_recover_knobs():
    from lpld.config.schema import unknown_keys

    cfg = compose_cfg(["dataset=tiny", "+dataset.recipe.recover_by_method.sre2l.alhpa=3"], raw=True)
    assert unknown_keys(cfg) == ["dataset.recipe.recover_by_method.sre2l.alhpa"]
    assert unknown_keys(compose_cfg(["dataset=tiny"], raw=True)) == []


def test_in21k_stats_batch_and_its_switch():
    from lpld.artifacts import stats
    from lpld.config import stats_settings

    def st(*o: str):
        return compose_cfg(["dataset=in21k", "model=resnet18", "stage=stats", *o])

    assert stats_settings(st())["batch_size"] == 1024
    assert stats_settings(st("stage.batch_size=256"))["batch_size"] == 256
    assert stats.spec(st()).key() != stats.spec(st("stage.batch_size=256")).key()  # different EMA, other file
    assert stats_settings(compose_cfg(["dataset=in1k", "stage=stats"]))["batch_size"] == 256
