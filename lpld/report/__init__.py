"""Reporting: results records, paper-shaped tables, the Pareto plot and image grids.

* :mod:`lpld.report.records`: one JSON line per finished student run (append / replace / load).
* :mod:`lpld.report.table`: records -> rows x columns (mean ± std over seeds), markdown / CSV.
* :mod:`lpld.report.pareto`: accuracy versus total storage with the Pareto front.
* :mod:`lpld.report.grids`: image grids of distilled datasets (uint8 tensors, PNG files).

Nothing in ``lpld.core`` imports this package; the stages ``report``, ``analyze`` and ``student`` do.
"""
