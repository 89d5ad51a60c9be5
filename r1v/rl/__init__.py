"""GRPO: pure algorithm functions, the update and rollout phases, the trainer loop, and the `grpo` stage kind."""
