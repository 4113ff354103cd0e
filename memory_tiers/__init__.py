"""Memory tiers (DDR object store, HBM device cache, SRAM active slots) and placement.

Plain classes, no Ray (the cluster supplies the Ray object store, the arena file and
the liveness probe for grant holders):

- ``packing``: an expert as one contiguous uint8 buffer + a JSON tensor index;
- ``ddr``: the ``ObjectStore`` protocol and ``DDRStore`` (rebuilds lost objects from disk);
- ``arena``: device arenas (shared host file, in-process, CUDA) and region allocation;
- ``eviction``: eviction policies ``lru``, ``lfu``, ``cost_aware``;
- ``hbm``: one device's byte budget, leases, pinning, eviction, counters;
- ``switch``: meta-device model skeletons, bulk copies, rebinding as views;
- ``sram``: active slots per device;
- ``tier_stats``: residency snapshots and counters, and their text form;
- ``placement``: the placement service tying the tiers together;
- ``grants``: ``Grant`` (a lease plus an active slot) and the ledger of who holds which;
- ``grant_service``: grants per request, residency reports after a restart, and
  reclaiming dead holders' grants, around one device's placement service;
- ``errors``: the typed errors of all of the above.
"""
