"""Every error that names a fix: the test follows the fix and checks that it works (stages run in process).

Also the silent mislabels of issue 14 group 4 (records are a function of the finished run) and the disk-full
simulation of a student run. Fast tier: each stage runs seconds on a 12-image tree.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lpld.artifacts import images as images_artifact
from lpld.artifacts import results as results_artifact
from lpld.artifacts import teacher as teacher_artifact
from lpld.core.io import ArtifactError, aside_path
from lpld.core.label_store import LabelStore
from lpld.report.records import load_records
from lpld.stages import ConfigError, dispatch

from .helpers import compose_cfg, save_random_teacher, stage_overrides, student_cfg


class Epochs(L.Callback):
    """Records the epochs a run trains (to tell a resume from a start from scratch)."""

    def __init__(self):
        self.seen: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.seen.append(int(trainer.current_epoch))


@pytest.fixture(scope="module")
def scfg(tmp_path_factory):
    return student_cfg(tmp_path_factory.mktemp("fix"))


def _root(cfg):
    return Path(str(cfg.paths.root))


def _results(cfg, name="results"):
    return results_artifact.dir(cfg) / f"{name}.jsonl"


def test_truncated_logits_then_overwrite_regenerates_the_store(tmp_path):
    cfg = student_cfg(tmp_path)
    relabel_cfg = compose_cfg(["stage=relabel", *stage_overrides(tmp_path)])
    from lpld.artifacts import labels as labels_artifact

    store = labels_artifact.path(relabel_cfg)
    good = (store / "logits.npy").read_bytes()
    (store / "logits.npy").write_bytes(good[: len(good) // 2])
    with pytest.raises(ArtifactError, match="stage.overwrite=true") as ei:
        dispatch(cfg)  # the student refuses the store
    assert "logits.npy" in str(ei.value)
    with pytest.raises(ArtifactError, match="stage.overwrite=true"):
        dispatch(relabel_cfg)  # a plain rerun of relabel says the same (it does not call the store complete)
    dispatch(compose_cfg(["stage=relabel", *stage_overrides(tmp_path), "stage.overwrite=true"]))  # the fix
    assert (store / "logits.npy").read_bytes() == good  # same config, same bytes
    assert not aside_path(store).exists()
    LabelStore.open(store, verify="full")
    dispatch(cfg)
    assert len(load_records(_results(cfg))) == 1


def test_truncated_student_checkpoint_then_overwrite_retrains_from_scratch(scfg, monkeypatch):
    from lpld.stages import student

    cfg = compose_cfg(["stage=student", *stage_overrides(_root(scfg)), "stage.results_name=ckpt"])
    student.run(cfg)
    run_dir = next(p.parent for p in (_root(scfg)).rglob("final.json") if "ckpt" in p.read_text())
    (run_dir / "final.json").unlink()  # an unfinished run with a damaged last.ckpt
    last = run_dir / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="stage.overwrite=true") as ei:
        student.run(cfg)
    assert str(last) in str(ei.value)
    ep = Epochs()
    monkeypatch.setattr(student, "extra_callbacks", [ep])
    student.run(
        compose_cfg(["stage=student", *stage_overrides(_root(scfg)), "stage.results_name=ckpt", "stage.overwrite=true"])
    )
    assert ep.seen == [0, 1, 2]  # from scratch
    assert len(load_records(_results(cfg, "ckpt"))) == 1  # the one record, not two
    assert student.checkpoint_readable(last) and not aside_path(run_dir).exists()


def test_overwrite_on_a_finished_student_retrains_without_duplicate_records(scfg, monkeypatch):
    from lpld.stages import student

    ov = [*stage_overrides(_root(scfg)), "stage.results_name=ow"]
    student.run(compose_cfg(["stage=student", *ov]))
    first = load_records(_results(scfg, "ow"))
    ep = Epochs()
    monkeypatch.setattr(student, "extra_callbacks", [ep])
    student.run(compose_cfg(["stage=student", *ov, "stage.overwrite=true"]))
    assert ep.seen == [0, 1, 2]  # retrained from epoch 0, not resumed at the last epoch
    recs = load_records(_results(scfg, "ow"))
    assert len(recs) == 1 and recs[0]["run_key"] == first[0]["run_key"]
    assert recs[0]["top1"] == first[0]["top1"]  # same config, same result


def test_finished_student_writes_its_record_where_asked(scfg, monkeypatch):
    from lpld.stages import student

    ov = stage_overrides(_root(scfg))
    student.run(compose_cfg(["stage=student", *ov, "stage.results_name=a"]))
    ep = Epochs()
    monkeypatch.setattr(student, "extra_callbacks", [ep])
    # another results name: no retraining, the record appears there
    out = student.run(compose_cfg(["stage=student", *ov, "stage.results_name=b"]))
    assert out["reused"] and ep.seen == []
    a, b = load_records(_results(scfg, "a")), load_records(_results(scfg, "b"))
    assert len(b) == 1 and b[0]["run_key"] == a[0]["run_key"] and b[0]["top1"] == a[0]["top1"]
    assert b[0]["config"]["stage"]["results_name"] == "b"
    # the results file deleted: the rerun writes the record back, once
    _results(scfg, "a").unlink()
    student.run(compose_cfg(["stage=student", *ov, "stage.results_name=a"]))
    student.run(compose_cfg(["stage=student", *ov, "stage.results_name=a"]))
    assert [r["run_key"] for r in load_records(_results(scfg, "a"))] == [a[0]["run_key"]]


def test_achieved_prune_ratio_is_recorded_and_warned(scfg, caplog):
    """prune=10x on 3 epochs x 3 batches keeps 1 stored batch: 9x, recorded as achieved, with a warning."""
    from lpld.stages import student

    ov = [*stage_overrides(_root(scfg)), "prune=10x"]
    dispatch(compose_cfg(["stage=relabel", *ov]))
    with caplog.at_level("WARNING", logger="lpld"):
        student.run(compose_cfg(["stage=student", *ov, "stage.results_name=ratio"]))
    rec = load_records(_results(scfg, "ratio"))[-1]
    man = json.loads((Path(rec["store_dir"]) / "manifest.json").read_text())
    units = man["epochs"] * man["batches_per_epoch"]
    assert (units, man["num_batches"]) == (9, 1)
    assert rec["prune"]["name"] == "10x" and rec["prune"]["ratio"] == pytest.approx(0.9)
    assert rec["prune"]["achieved_factor"] == pytest.approx(9.0)
    assert rec["prune"]["achieved_ratio"] == pytest.approx(1 - 1 / 9)
    assert "9.00x" in caplog.text


def test_unreachable_prune_ratio_is_refused_and_a_lower_one_works(tmp_path):
    student_cfg(tmp_path)  # images + 1x store
    ov = stage_overrides(tmp_path)
    with pytest.raises(ArtifactError, match=r"prune=100x asks for 100\.0x .*choose a lower ratio") as ei:
        dispatch(compose_cfg(["stage=relabel", *ov, "prune=100x"]))
    assert "relabel.epochs" in str(ei.value)
    dispatch(compose_cfg(["stage=relabel", *ov, "prune=10x"]))  # 3 batches x 3 epochs: keeps 1 = 9x, within 4x


def test_quant_k_zero_names_the_key_and_the_suggested_value_works(tmp_path):
    student_cfg(tmp_path)
    ov = stage_overrides(tmp_path)
    with pytest.raises(ConfigError, match=r"quant\.k=0.*quant\.k=3") as ei:
        dispatch(compose_cfg(["stage=relabel", *ov, "quant=mr", "quant.k=0"]))
    fix = str(ei.value).split("e.g. ")[1].split(")")[0]
    dispatch(compose_cfg(["stage=relabel", *ov, "quant=mr", fix]))


def test_recover_iterations_zero_is_refused_and_the_fix_works(tmp_path):
    ov = stage_overrides(tmp_path)
    cfg = compose_cfg(["stage=recover", *ov, "recover=sre2l", "recover.iterations=0"])
    save_random_teacher(cfg)
    with pytest.raises(ConfigError, match=r"recover\.iterations.*recover\.iterations=1000"):
        dispatch(cfg)
    fixed = compose_cfg(["stage=recover", *ov, "recover=sre2l", "recover.iterations=2"])
    assert not images_artifact.path(fixed).parent.exists()  # nothing written
    dispatch(fixed)
    assert json.loads((images_artifact.path(fixed) / "manifest.json").read_text())["complete"]


def test_stats_from_another_teacher_names_the_recover_key_and_it_works(tmp_path):
    ov = [*stage_overrides(tmp_path), "recover=lpld", "recover.iterations=2"]
    cfg = compose_cfg(["stage=stats", *ov])
    save_random_teacher(cfg)
    dispatch(cfg)
    # a different teacher now sits at the teacher path
    from lpld.core.io import atomic_torch_save, fingerprint_state_dict
    from lpld.stages.common import build_teacher_model

    torch.manual_seed(1)
    state = build_teacher_model(cfg).state_dict()
    atomic_torch_save(teacher_artifact.path(cfg), {"state_dict": state, "fingerprint": fingerprint_state_dict(state)})
    with pytest.raises(ArtifactError, match=r"recover\.allow_other_teacher=true"):
        dispatch(compose_cfg(["stage=recover", *ov]))
    dispatch(compose_cfg(["stage=recover", *ov, "recover.allow_other_teacher=true"]))  # Hydra accepts the key
    assert json.loads((images_artifact.path(cfg) / "manifest.json").read_text())["complete"]


def test_disk_full_during_student_cleans_partial_checkpoints_and_resumes(tmp_path, monkeypatch):
    from lpld.stages import student

    cfg = student_cfg(tmp_path)

    class DiskFull(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:  # epoch 0's checkpoint is complete; epoch 1's write is cut short
                run_dir = next(tmp_path.rglob("last.ckpt")).parent
                (run_dir / "epoch1.ckpt").write_bytes(b"PK\x03\x04partial")
                raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "epoch1.ckpt"))

    monkeypatch.setattr(student, "extra_callbacks", [DiskFull()])
    with pytest.raises(ArtifactError, match=r"filled up.*removed 1 partial checkpoint.*rerun the same command"):
        student.run(cfg)
    run_dir = next(tmp_path.rglob("last.ckpt")).parent
    assert not (run_dir / "epoch1.ckpt").exists()
    assert all(student.checkpoint_readable(p) for p in run_dir.glob("*.ckpt"))
    ep = Epochs()
    monkeypatch.setattr(student, "extra_callbacks", [ep])
    student.run(cfg)  # the fix: rerun the same command, it resumes
    assert ep.seen and ep.seen[0] >= 1
    assert len(load_records(_results(cfg))) == 1


def test_read_only_artifacts_folder_is_one_clear_error(tmp_path, capsys):
    from lpld.stages import user_errors

    ro = "/sys/lpld-read-only-test"  # a read-only file system even for root
    cfg = compose_cfg(["stage=squeeze", *stage_overrides(tmp_path), f"paths.artifacts={ro}"])
    with pytest.raises(SystemExit) as ei, user_errors(cfg):
        dispatch(cfg)
    assert ei.value.code == 1
    err = capsys.readouterr().err
    assert "paths.artifacts=" in err and "Traceback" not in err and "lpld-read-only-test" in err
