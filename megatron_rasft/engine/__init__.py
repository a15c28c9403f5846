"""The Megatron-Core side of training: model build, optimizer, one step through the pipeline
schedules, the no-grad scoring pass (reference, pi_old, probes) and checkpoints."""
