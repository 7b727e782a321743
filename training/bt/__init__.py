"""Bradley–Terry reward modeling with the options of "Secrets of RLHF in LLMs Part II: Reward
Modeling" (arXiv 2401.06080): the trainer (``trainer``), preference strength from an RM
ensemble (``strength``) and the strength file both read (``strength_file``).
"""
