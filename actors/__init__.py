"""Expert actors as plain classes: engines, checkpoints, demo weights, the expert server."""
