"""The benchmark, the zoos, the demos and the speed bench: clients of the library (they may import any of it);
the library never imports them. The command line reaches them through its ``zoo``, ``bench`` and ``eval`` commands."""
