"""MetaRM: "Shifted Distributions Alignment via Meta-Learning" (arXiv 2405.00438). The
trainer (``trainer``) and the rounds of sample → MetaRM → adapt that ``POST /adapt`` runs with
``params.metarm`` (``rounds``).
"""
