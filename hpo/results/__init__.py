"""Results of a study: the summary, the report, and the retrained (or replayed) best configuration.

- ``summary``: one summary of a study (trials by state, best trial, epochs saved), printed and tabled
- ``report``:  ``write_report``: the HTML page of plotly figures, ``trials.csv``, ``summary.json``
- ``retrain``: ``retrain`` a trial on training + validation data and test it once (``SavedModel``);
               re-evaluate the top trials over seeds; ``replay`` a trial as the search trained it

May import: ``hpo.errors``, ``hpo.folders``, ``hpo.studyfile``, ``hpo.training``, ``hpo.tuning``.
"""
