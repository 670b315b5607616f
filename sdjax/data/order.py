"""The data order: what each process reads next, the same on every run, and how another number of processes
continues it.

The data is a list of `units` (an example of a random-access source, a shard file of a streamed one), read
epoch after epoch in an order reshuffled every epoch from the seed: global position g is unit
`shuffled(g)` of epoch g // units, and each of its members (a shard's examples; an example has one) is
read once. A process's plan lists the positions it reads, in order: first `catchup`, [g, first member]
pairs left over by a run with another process count, then, from `base` on, its `block` of every
count * block positions (block: a process's batch size for single examples, so that the processes' batches
together are the global batch one process would read; 1 for shards).
Its progress (k, offset) says it reads member `offset` of its plan's k-th position next.
Plans and progress are JSON-able: they are what a checkpoint stores.
"""
import grain


def plan(units, index, count, block=1):
    """Process `index` of `count`'s plan from the beginning."""
    return {"units": units, "base": 0, "index": index, "count": count, "block": block, "catchup": []}


def shuffled(units, seed):
    """g -> the unit at global position g (any g >= 0; a new order every `units` positions)."""
    return grain.MapDataset.range(units).seed(seed).shuffle()


def position(p, k):
    """(global position, first member) of plan p's k-th position."""
    c = p["catchup"]
    if k < len(c):
        return tuple(c[k])
    rounds, j = divmod(k - len(c), p["block"])
    return p["base"] + (rounds * p["count"] + p["index"]) * p["block"] + j, 0


def start(p):
    """The progress of a plan not read yet."""
    return {"k": 0, "offset": position(p, 0)[1]}


def resplit(states, count, block=1):
    """Progress states {"plan", "k", "offset"} for `count` processes (blocks of `block`) that continue where
    the processes of `states` (states[i]: process i's, all of one run) stopped: every member they did not read
    is read once, by one of the new processes, before anything new; nothing they read is read again in this
    epoch. Where they stopped together at a batch's end, the new processes read what they would have."""
    plans = [s["plan"] for s in states]
    base, old, width = plans[0]["base"], plans[0]["count"], plans[0]["block"]
    owner = {g: (p, i, first) for p, pl in enumerate(plans) for i, (g, first) in enumerate(pl["catchup"])}

    def unread(g):
        """The first member of position g not read yet, None if all were."""
        if g in owner:
            p, i, first = owner[g]
        elif g >= base:
            rounds, j = divmod(g - base, old * width)
            p, first = j // width, 0
            i = len(plans[p]["catchup"]) + rounds * width + j % width
        else:
            return None  # read by an earlier run
        k = states[p]["k"]
        return first if i > k else states[p]["offset"] if i == k else None

    at = [position(s["plan"], s["k"])[0] for s in states]
    end = max(max(at) + 1, base)  # from here on, nothing was read
    left = [[g, unread(g)] for g in range(min(at), end) if unread(g) is not None]
    while left and left[-1] == [end - 1, 0]:  # unread to the end: the new plans' own positions
        end -= 1
        left.pop()
    units = plans[0]["units"]
    plans = [{"units": units, "base": end, "index": q, "count": count, "block": block,
              "catchup": sum((left[r + q * block:r + (q + 1) * block] for r in range(0, len(left), count * block)),
                             [])} for q in range(count)]
    return [{"plan": p, **start(p)} for p in plans]
