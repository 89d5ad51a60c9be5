"""Scoring and selection for Stage 2 of the recipe (iterative SFT, METHOD.md section 3).

A reward model scores every sample 0..5 (`score` stage, pluggable scorers: `openai`, `local`, `rule`); the model
of the previous round answers the corpus (`generate` stage: extracted answer and whether it matched, per row);
`select` builds the next round's corpus {x : score(x) >= tau} U E_{t-1}.
"""

# First: r1v.config's last lines import r1v.score.config (so workflows validate without r1v.stages), which needs
# r1v.score.base whole. Entering through r1v.score.base itself would meet it half-initialised.
import r1v.config  # noqa: E402,F401
