"""Side-by-side benchmarks of mproc against its peers (issue 4).

Run by hand::

    python -m benchmarks            # the full suite (under 2 minutes on 2 cores)
    python -m benchmarks --quick    # a smoke run (about 15 s)
    python -m benchmarks --only round_trip --json /tmp/rt.json

It prints one table (and writes it, with every raw sample and the machine,
to ``benchmarks/results.json``): each mproc figure next to its peer's,
measured in the same run, interleaved repetition by repetition, each the
median of K repetitions (5; 2 with ``--quick``). Nothing in the table is
hard-coded: the only constants are the workload sizes and issue 4's targets.

Method, for fairness:

* Sender, receiver and echo processes are forked (``multiprocessing``'s
  ``fork`` context, or ``os.fork`` where thousands are needed): the
  cheapest start on Linux, and the same for every peer. They are set up
  first, say ready through a pipe and block on a second pipe; the clock
  starts when this process releases them all at once.
* The hot loops call the blocking form of every peer's receive (no
  timeout: ``Queue.get(timeout=...)`` would add a ``poll()`` per message);
  a watchdog thread bounds each measurement instead.
* pyzmq (optional ``bench`` extra) keeps its default high-water marks; its
  senders stay connected until the receiver has everything, because
  libzmq drops what a PULL socket holds over its HWM when a peer leaves.
* The run uses a private ``MPROC_RUNTIME_DIR`` under /tmp; at the end every
  child is reaped and the directory is checked for leftover sockets, then
  removed.
"""
