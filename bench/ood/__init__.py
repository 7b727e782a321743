"""OOD preference-learning benchmark (issue 6, the OOD-PL paper's table).

For each task (CSG, KA) and seed, on the benchmark's source domains:

- ``base``:  the reference policy, untouched;
- ``dpo``:   DPO on the pooled source training pairs, no target adaptation;
- ``bt``:    a MiniLM RM trained by plain Bradley–Terry on the pooled source pairs, then
             the meta-test adaptation on each held-out domain's prompts;
- ``meta``:  the OOD-PL meta-trained MiniLM RM, then the same adaptation.
- ``vanilla+rounds`` / ``metarm+adapt`` / ``metarm-phi+adapt`` (issue 7, ``bench/metarm_rows.py``):
             the ``bt`` RM, then R rounds on the held-out domain (sample from the current
             policy → update the RM on the pooled source pairs with those samples as the meta
             set → adapt the policy; the ``bt`` adaptation steps split over the rounds). Vanilla
             is meta_lr 0; ``metarm`` keeps the ascent (update: alternating), ``metarm-phi`` is
             the DESIGN §7 form (update: first_order, the paper's rule). Per round: the variance of reward differences
             among responses to the same prompt on the policy's samples.

Every policy is scored on each held-out domain's test split: PL accuracy (share of test
pairs with log π(y_w|x) > log π(y_l|x)) and the gold reward (CSG: VADER sentiment, KA:
token-F1 to the true gloss) of its samples on the test prompts (same seed for every method).
The adaptation draws come from the domain's shipped training samples, which are the
reference policy's own samples (the domain's sampling distribution p).

    python -m bench.ood --quick        # minutes: 1 seed, 2 held-out domains per task, short runs
    python -m bench.ood                # full: 3 seeds, 4 held-out domains per task (OOD-PL table)
    python -m bench.ood --methods bt,vanilla+rounds,metarm+adapt   # + the MetaRM rows
    python -m bench.ood --quick --methods base,bt,vanilla+rounds,metarm+adapt,metarm-phi+adapt
    python -m bench.ood --tasks csg --output a.json & python -m bench.ood --tasks ka --output b.json
    python -m bench.ood --merge a.json b.json   # one table, targets and figure from both
    python -m bench.ood --jobs 2                # the same, one process per (task, seed), 2 at once

Prints a table and writes bench/results/ood.json (rows, costs, targets).
Target (the paper's claim): per task, meta beats both bt and dpo on ≥ 3 of 4 held-out domains
(gold reward; PL accuracy reported as a second target). MetaRM (issue 7): metarm beats the
un-adapted RM (bt) on held-out PL accuracy and gold reward, and its final-round reward-difference
variance stays above vanilla's; figure bench/results/metarm_variance.png.
"""
