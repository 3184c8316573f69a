"""Artifacts: one module per artifact (teacher, stats, images, labels, students, results).

Each module has ``spec(exp) -> <Artifact>Spec`` (a frozen dataclass of the resolved values that determine
the artifact's bytes, with ``key()`` = readable prefix + 8-hex signature and ``path(root)``) and
``path(exp)``, plus ``open`` / ``prepare`` / ``verify`` where a stage reads or writes the artifact.
Producers and consumers build the same spec from the same config, so no stage hands another a path.

Layout under ``paths.artifacts``::

    <dataset>/<teacher key>/teacher/teacher.pt                          squeeze (+ last.ckpt to resume)
    <dataset>/<teacher key>/stats/<mode>_<hex>.pt                       stats
    <dataset>/<teacher key>/images/<images key>/                        recover: PNGs + manifest.json
    <dataset>/<teacher key>/labels/<images key>/<store key>/            relabel: label store
    <dataset>/<teacher key>/students/<images key>/<store key>/<run key>/ student runs
    <dataset>/results/<name>.jsonl                                      student records
"""
