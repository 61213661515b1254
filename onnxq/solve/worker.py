"""Helper process of `onnxq.solve.dispatch.solve_block`: solves the layers it is sent (pickled on stdin, results on stdout).

Started as `python -m onnxq.solve.worker`, so it never imports the caller's `__main__` (multiprocessing's spawn
would, and re-run an unguarded user script).
"""
from __future__ import annotations

import os
import pickle
import signal
import sys


def main() -> None:
    """Serve (layer, W, stats, recipe) requests until stdin closes; reply (True, result) or (False, exception)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it closes our stdin
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to stderr, never into the replies
    import torch

    from onnxq.solve.dispatch import solve_layer
    from onnxq.solve.heap import SOLVE_MMAP, set_mmap_threshold, trim_heap

    torch.set_num_threads(1)
    set_mmap_threshold(SOLVE_MMAP)
    requests = sys.stdin.buffer
    while True:
        try:
            args = pickle.load(requests)
        except EOFError:
            return
        try:
            reply = (True, solve_layer(*args))
        except Exception as err:  # the parent raises it
            reply = (False, err)
        pickle.dump(reply, replies, protocol=pickle.HIGHEST_PROTOCOL)
        replies.flush()
        del args, reply
        trim_heap()  # this layer's problem and result too (solve_layer trims its temporaries)


if __name__ == "__main__":
    main()
