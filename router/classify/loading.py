"""Loading a saved router classifier of any kind, as the cluster and the commands do.

A directory holds one of the vector classifiers (router.classify.classifier), a text
classifier (router.classify.features), or a text classifier with neighbour votes saved
beside it (router.classify.vote_classifier); the saved kind and files say which.
"""

from __future__ import annotations

from pathlib import Path

from router.classify.classifier import TrainableClassifier, load_classifier, read_saved
from router.classify.features import TEXT_KIND, TextClassifier, load_text_classifier
from router.classify.vote_classifier import (
    NeighbourVoteClassifier,
    has_neighbour_votes,
    load_neighbour_votes,
)


def load_router_classifier(
    directory: Path,
) -> TrainableClassifier | TextClassifier | NeighbourVoteClassifier:
    """Whatever kind of classifier was saved in `directory`, with its neighbour votes."""
    meta, _ = read_saved(directory)
    if meta["kind"] == TEXT_KIND:
        text_classifier = load_text_classifier(directory)
        if has_neighbour_votes(directory):
            return load_neighbour_votes(directory, text_classifier)
        return text_classifier
    return load_classifier(directory)
