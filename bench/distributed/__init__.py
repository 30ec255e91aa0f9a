"""The distributed layer: launch, ranks, reductions and rank-0 writing, in one room.

The engine and the core call it; methods never do. In a world of one every function here is the
identity, so a single-process run is exactly the run it was before.
"""
from bench.distributed.collectives import (all_cat, all_cat_uneven, all_sum, average_gradients, barrier,
                                           broadcast, broadcast_module, shard)
from bench.distributed.faults import stop_on_sigterm
from bench.distributed.world import World, join, leave, pick_device, world, world_device

__all__ = ["World", "all_cat", "all_cat_uneven", "all_sum", "average_gradients", "barrier", "broadcast", "broadcast_module", "join",
           "leave", "pick_device", "shard", "stop_on_sigterm", "world", "world_device"]
