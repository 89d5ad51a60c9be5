"""Scoring and selection for Stage 2 of the recipe (iterative SFT, METHOD.md section 3).

A reward model scores every sample 0..5 (`score` stage, pluggable scorers: `openai`, `local`, `rule`); the model
of the previous round answers the corpus (`generate` stage: extracted answer and whether it matched, per row);
`select` builds the next round's corpus {x : score(x) >= tau} U E_{t-1}.
"""
