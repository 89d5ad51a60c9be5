"""SFT on Ray Train + DeepSpeed: engine set-up, checkpoints, the worker loop and the stage driver."""
