"""Adapters from other libraries' model outputs to nkd's losses.

Each adapter lives in its own module and imports its library lazily, so ``import nkd`` works
without it: ``nkd.integrations.hf`` for Hugging Face ``transformers`` causal LMs (extra ``nkd[lm]``),
``nkd.integrations.trl`` for TRL's GKD and on-policy distillation trainers (extra ``nkd[trl]``).
"""
