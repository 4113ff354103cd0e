"""The two-step router as plain classes (no Ray): embedder, classifier, category map."""
