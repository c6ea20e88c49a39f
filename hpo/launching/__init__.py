"""Launching searches: the hpo.run command line, the search session, and worker processes here or on Slurm.

- ``run_args``:   THE ``hpo.run`` command line: flags → ``RunRequest``; every worker's argv
- ``session``:    a search: checks → study → data on the device once → trials here or in launched workers
                  (``run_search``, and ``search``, the Python entry point)
- ``local``:      worker processes per GPU on this machine, their output and one progress bar
- ``slurm``:      Slurm job arrays of workers through submitit; clean stops on time limits
- ``array_task``: one task of ``slurm/hpo-array.sbatch``, which becomes hpo.run

May import: ``hpo.errors``, ``hpo.folders``, ``hpo.cli`` (flag types), ``hpo.studyfile``, ``hpo.training``,
``hpo.tuning``.
"""
