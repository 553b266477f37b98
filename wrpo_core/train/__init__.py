"""Training the target model: the SFT and WRPO trainers and the launchers that run them as jobs.

`sft` and `wrpo` hold the trainers and `common` what they share; `metrics` owns a job's
metrics.jsonl and `checkpoints` finds where a job resumes. `jobs` says what a job is and runs it
in one process; `launch.launch_job` runs it with its launcher: `torchrun` (whose ranks run
`worker`, and whose log `joblog` reads for the job's error) or `ray_train`.
"""
