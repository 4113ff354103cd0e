"""Memory tiers (DDR object store, HBM device cache, SRAM active slots) and placement.

Plain classes, no Ray (the cluster package supplies the Ray object store):

- ``packing``: an expert as one contiguous uint8 buffer + a JSON tensor index;
- ``ddr``: the ``ObjectStore`` protocol and ``DDRStore`` (rebuilds lost objects from disk);
- ``arena``: device arenas (shared host file, in-process, CUDA) and region allocation;
- ``policies``: eviction policies ``lru``, ``lfu``, ``cost_aware``;
- ``hbm``: one device's byte budget, leases, pinning, eviction, counters;
- ``switch``: meta-device model skeletons, bulk copies, rebinding as views;
- ``sram``: active slots per device;
- ``placement``: the placement service tying them together;
- ``simulator``, ``profiles``, ``trace``: the trace-driven tier simulator.
"""
