"""Test helpers shipped with the package (tiny HF models, live-tensor memory accounting).

Runtime code never imports from here; the multi-rank launcher lives in ``megatron_tip.launch``.
"""
