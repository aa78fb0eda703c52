"""`make bench`: benchmark rows, each a harness figure against a reference measured in the same run.

Run it as `python -m harness.bench` (see `harness/bench/__main__.py`). Each group is a module with
one function `(Bench) -> rows`: loader, trial (and overhead), ensemble, report, study (search and
workers); `common` holds the row format and the run's settings, `postgres` a throwaway server.
"""
