"""A run's machinery, none of which changes what it computes: its files and checkpoints
(run_files, checkpoints, atomic_files), its start and its one-line errors (start, errors),
stops by a scheduler (preemption), several processes (distributed) and progress lines."""
