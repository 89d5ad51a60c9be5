"""GRPO: pure algorithm functions, rewards, rollout engines, and the trainer loop."""

# First: r1v.config's last lines import r1v.rl.grpo_config, which needs r1v.config whole; entering through
# r1v.rl.grpo_config itself would meet it half-initialised.
import r1v.config  # noqa: E402,F401
