"""The stages, in the order the data flows through them (``vitok.run`` decides what to do and wires them).

    carry.py      unchanged images of a shard --update replaced: moved into the new shard, not read again
    loader.py     what a decode worker runs: units -> chunks of prepared images, in order within each unit;
                  workers.py: the worker processes (how many, ending with the run, surviving one that dies)
    dedupe.py     each distinct image encoded once: rows copied from a committed shard or an earlier copy
    batcher.py    images -> batches under a token budget, never spanning units
    device.py     the device stage: encode, pool (pool.py), cast to the stored dtype (cast.py), copy to the host;
                  emits finished batches and each unit's end, in order
    sink.py       one output shard being written; committer.py: the writer thread that commits a unit at its end
    types.py      the data between the stages (Item, Chunk, Batch, EncodedBatch, UnitEnd), without torch
"""
