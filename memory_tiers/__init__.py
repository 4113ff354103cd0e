"""Memory tiers (DDR object store, HBM device cache, SRAM active slots) and placement.

Not built yet: the configuration already carries `tiers:` settings (HBM budget,
eviction policy, pinned experts), validated but not acted on. See ARCHITECTURE.md.
"""
