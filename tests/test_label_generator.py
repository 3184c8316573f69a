"""A label generator shipped instead of a store (issue 21, item 6): trained on the teacher's outputs on the distilled
images' augmentations, it reproduces them on augmentations it never saw, and its bytes are its fp16 state."""

from __future__ import annotations

import dataclasses

import torch

from tests.conftest import compose_cfg, make_tiny_chain


def test_generator_learns_the_teacher_on_unseen_augmentations(tmp_path):
    from lpld.artifacts import images as images_artifact
    from lpld.artifacts import labels as labels_artifact
    from lpld.artifacts import teacher as teacher_artifact
    from lpld.core.augment import to_model_input
    from lpld.core.label_generator import build_generator, evaluate_generator, train_generator
    from lpld.core.online_labels import OnlineSchedule
    from lpld.core.storage_accounting import model_bytes

    _, ov = make_tiny_chain(tmp_path)
    exp = compose_cfg(["stage=student", *ov])
    teacher, _ = teacher_artifact.load(exp)
    u8, _, _ = images_artifact.open(exp, teacher_fingerprint=None, allow_other_teacher=True)
    images = to_model_input(u8, tuple(exp.dataset.mean), tuple(exp.dataset.std))
    spec = labels_artifact.store_spec(exp, num_images=u8.shape[0])
    train = OnlineSchedule(dataclasses.replace(spec, seed=101, epochs=12))  # the generator's own draws
    held_out = OnlineSchedule(dataclasses.replace(spec, seed=202, epochs=2))  # crops it never saw
    # a teacher whose logits are far from uniform, so the divergence measures something
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(20.0)
    t = 4.0
    before = evaluate_generator(build_generator(4, 3, 16, 2).eval(), teacher, images, held_out, t)
    gen, hist = train_generator(teacher, images, train, t, passes=1, width=16, depth=2, lr=1e-2, seed=0)
    after = evaluate_generator(gen, teacher, images, held_out, t)
    assert hist["steps"] == len(train) == len(hist["loss"])
    assert before["kl"] > 0 and after["kl"] < 0.5 * before["kl"], (before, after)
    assert after["top1_agreement"] >= before["top1_agreement"]
    # what ships: every parameter / buffer already an fp16 value; bytes by hand (fp16 floats, int64 BN counters)
    for v in gen.state_dict().values():
        if v.is_floating_point():
            assert torch.equal(v, v.half().float())
    hand = 0
    for m in gen.modules():
        if isinstance(m, torch.nn.Conv2d):
            hand += 2 * m.weight.numel()
        elif isinstance(m, torch.nn.BatchNorm2d):
            hand += 2 * 4 * m.num_features + 8  # weight, bias, running mean / var; num_batches_tracked int64
        elif isinstance(m, torch.nn.Linear):
            hand += 2 * (m.weight.numel() + m.bias.numel())
    assert model_bytes(gen, torch.float16) == hand
    # the same seed, the same generator (bit for bit)
    gen2, _ = train_generator(teacher, images, train, t, passes=1, width=16, depth=2, lr=1e-2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(gen.state_dict().values(), gen2.state_dict().values()))


def test_a_generator_student_trains_and_records_the_generator_bytes(tmp_path):
    """student.labels=generator: the student queries a generator trained in the stage; the record counts its fp16
    bytes (hand count from the configured width / depth), 0 label and record bytes, its own frontier family."""
    from lpld.artifacts import results as results_artifact
    from lpld.report.accounting import byte_parts
    from lpld.report.frontier import frontier_rows
    from lpld.report.records import load_records
    from lpld.stages import run_stage

    _, ov = make_tiny_chain(tmp_path)
    knobs = ["student.labels=generator", "student.generator_width=8", "student.generator_depth=2"]
    exp = compose_cfg(["stage=student", *ov, *knobs])
    out = run_stage(exp)
    assert 0.0 <= out["top1"] <= 1.0
    (rec,) = [r for r in load_records(results_artifact.path(exp, "results")) if r["labels"] == "generator"]
    c, w = 4, 8  # 4 classes, width 8, depth 2 on 3 channels
    convs = 2 * (3 * w * 9 + w * w * 9)  # two 3x3 kernels, no bias, fp16
    bns = 2 * (2 * 4 * w + 8)  # two BatchNorms: weight, bias, running mean, running var fp16 + an int64 counter
    hand = convs + bns + 2 * (w * c + c)  # + the linear layer
    assert rec["model_bytes"] == hand and rec["model_bytes_of"] == "label generator fp16"
    assert rec["student"]["generator_width"] == 8 and rec["student"]["generator_depth"] == 2
    parts = byte_parts(rec)
    assert parts["labels"] == 0 and parts["records"] == 0 and parts["model"] == hand
    assert [r["label_kind"] for r in frontier_rows([rec])] == ["generator"]
