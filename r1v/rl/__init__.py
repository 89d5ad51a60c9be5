"""GRPO: pure algorithm functions, rewards, rollout engines, and the trainer loop."""
