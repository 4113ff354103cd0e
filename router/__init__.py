"""The two-step router as plain classes (no Ray): embedder, classifier, category map.

router.embed, router.classify, router.choose, router.two_step, router.decision and
router.jsonl are the serving path; router.training fits, tunes and evaluates offline
and is never imported by the serving path.
"""
