"""trainerd: the trainer that follows a growing packerd cache, its checkpoints and the `ckpt` admin command."""
