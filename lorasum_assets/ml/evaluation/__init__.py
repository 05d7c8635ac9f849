"""Judging summaries: ``bertscore``, ``rouge``, ``stats`` (bootstrap CIs, plain and paired),
``scoring`` (per example, means, CIs and deltas) and ``promotion_rule`` (champion vs challenger).

Torch-free: rouge, stats, scoring, promotion_rule
"""
