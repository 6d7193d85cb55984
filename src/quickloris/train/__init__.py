"""quickloris' own training loop and the `quickloris train` / `quickloris eval` runs built on it.

* `quickloris.train.config`     -- `ModelConfig`, `TrainConfig`, `EvalConfig`, `EvalTaskConfig` (CLI options)
* `quickloris.train.loop`       -- the loop: token-normalised gradient accumulation, warm-up + decay, progress bar,
                                   stop on a non-finite loss / gradient norm
* `quickloris.train.checkpoint` -- resumable checkpoints (adapter, AdamW, RNG, step, loss history), atomic, with a
                                   checksum manifest; the data fingerprint
* `quickloris.train.rundir`     -- what --output-dir may be (marker, --overwrite, the --model / --adapter folders)
* `quickloris.train.report`     -- loss-curve PNG, metrics.json
* `quickloris.train.runtime`    -- device, dtype, CPU threads, position limit, --eval-data problems, input checks
* `quickloris.train.run`        -- `run_train`: load, prepare, evaluate, train, save, evaluate; its steps are
                                   `.setup` (device, model, output folder, the checks), `.rundata` (tokenizer,
                                   data), `.build` (trainable model, AdamW, --resume), `.session` (evaluate, train,
                                   save, evaluate again) and `.summary` (the closing lines)
* `quickloris.train.exact_match` -- batched greedy generation scored by exact match (HF model or GGUF file)
* `quickloris.train.evaluation` -- `run_eval`: exact-match accuracy of a model (+ adapter); `evaluate`: of the model
                                   in memory (a train run's before / after)

It sits above `parallel`, `export`, `models` and `data`; it imports transformers
only through `quickloris.models.loading`.
"""
