"""Adaptive-length chain-of-thought distillation (METHOD.md section 4): QDAM and VTIA scores (`cues`, `quality`),
the DRLC repetition penalty (`drlc`) and their stage kind `distill.score`.
"""

# First: r1v.config's last lines import r1v.distill.config (so workflows validate without r1v.stages), which
# needs r1v.score.base and r1v.distill.cues whole. Entering through a submodule would meet r1v.config
# half-initialised.
import r1v.config  # noqa: E402,F401
