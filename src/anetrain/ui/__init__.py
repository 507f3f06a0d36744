"""Everything that shows a run: the live dashboard, console progress, plots and experiment trackers.

All of it reads the run directory contract of ``docs/run-directory.md`` (chiefly ``metrics.jsonl``) and
nothing else of the trainer, so it works on live runs, finished runs and runs from other machines alike.
"""
