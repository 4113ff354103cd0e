"""Ray Serve wiring: config, deployments, ingress, and the `coe` command."""
