"""``lpld.lit.fit.fit_with_resume``: resumes from last.ckpt exactly when it exists, and its hooks."""

from __future__ import annotations

import pytest

from lpld.lit.fit import fit_with_resume, resumable_checkpoint


class FakeTrainer:
    def __init__(self, error: BaseException | None = None, interrupted: bool = False):
        self.calls: list[dict] = []
        self.error, self.interrupted = error, interrupted

    def fit(self, module, **kw):
        self.calls.append(kw)
        if self.error is not None:
            raise self.error


def test_fresh_run_then_resume_from_last_ckpt(tmp_path):
    t = FakeTrainer()
    assert fit_with_resume(t, None, tmp_path, datamodule="dm", what="student") is None
    assert t.calls[-1] == {"datamodule": "dm", "ckpt_path": None, "weights_only": True}
    (tmp_path / "last.ckpt").write_bytes(b"x")
    assert fit_with_resume(t, None, tmp_path, train_dataloaders="tr", val_dataloaders="va") == tmp_path / "last.ckpt"
    assert t.calls[-1] == {
        "train_dataloaders": "tr",
        "val_dataloaders": "va",
        "ckpt_path": str(tmp_path / "last.ckpt"),
        "weights_only": True,
    }


def test_hooks_refuse_translate_and_interruption(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"x")

    def refuse(p):
        raise ValueError(f"corrupt {p.name}")

    t = FakeTrainer()
    with pytest.raises(ValueError, match="corrupt last.ckpt"):
        fit_with_resume(t, None, tmp_path, check_resume=refuse)
    assert t.calls == []  # refused before training

    def translate(e):
        raise KeyError("disk full") from e

    with pytest.raises(KeyError, match="disk full"):
        fit_with_resume(FakeTrainer(error=OSError(28, "no space")), None, tmp_path, on_error=translate)
    with pytest.raises(OSError):  # on_error returned: the original error propagates
        fit_with_resume(FakeTrainer(error=OSError(28, "no space")), None, tmp_path, on_error=lambda e: None)
    with pytest.raises(RuntimeError, match="teacher training was interrupted.*last.ckpt"):
        fit_with_resume(FakeTrainer(interrupted=True), None, tmp_path, what="teacher")
    assert fit_with_resume(FakeTrainer(interrupted=True), None, tmp_path, raise_if_interrupted=False) is not None


def test_resumable_checkpoint_keeps_last_and_newest(tmp_path):
    cb = resumable_checkpoint(tmp_path, every_n_epochs=0, save_on_train_epoch_end=True)
    assert cb.save_last and cb.save_top_k == 1 and cb.dirpath == str(tmp_path)
    assert cb._every_n_epochs == 1 and cb._save_on_train_epoch_end is True
