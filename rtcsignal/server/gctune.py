"""The garbage collector of a server process (``rtcsignal serve``), set once it listens.

CPython's cycle collector pauses the event loop while it runs, for a time proportional to the
tracked objects of the generations it scans, so its full collections are a latency tail.
Two things make them rare and short here:

- ``gc.freeze()`` once the service has started: the modules, classes and functions loaded at
  start-up (about 100k objects, most of a full collection's work) move to the permanent
  generation, which no collection scans again. Start-up garbage is collected just before.
- A larger first-generation threshold: the relay path allocates few tracked objects (a list of
  events per read, a tuple per message; frames are bytes), so collections come from
  connection objects, which are long-lived; fewer young collections promote fewer objects
  that die shortly after, and full collections (which also wait for the long-lived objects to
  grow by 25%) follow the number of connections instead of the message rate.

The library (``SignalingService``) leaves the collector alone: an embedding application owns
its process.
"""

from __future__ import annotations

import gc

#: Tracked allocations (minus deallocations) between young collections; CPython's default
#: is 700. The older generations keep their defaults.
GEN0_THRESHOLD = 10_000


def settle() -> None:
    """Collect start-up garbage, freeze what is left, raise the young threshold."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
