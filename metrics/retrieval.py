"""Image<->text retrieval top-k of a CLIP, beside the other scores; defined in models/retrieval.py.

The computation lives with the CLIP because every cached CLIP records it (models/ never imports metrics/).
"""

from diffablate.models.retrieval import retrieval_scores

__all__ = ["retrieval_scores"]
