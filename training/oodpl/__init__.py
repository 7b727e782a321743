"""OOD-PL: "Generalizing Reward Modeling for Out-of-Distribution Preference Learning"
(Jia, arXiv 2402.14760). Meta-training of the RM (``meta_train``), meta-test adaptation of
a policy to a new domain (``adapt``, what ``POST /adapt`` runs), and the DPO baseline (``dpo``).
"""
