"""`attngen verify --jobs N`: each spec verified in one of N worker processes (spawned, not forked:
a forked child of a process that has used CUDA cannot use it), the results handed back in spec
order. A worker inherits the parent's environment, so TRITON_INTERPRET, set by the command on a
machine without a GPU, holds in it too."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator


def verify_one(spec: str, dtypes: list[str] | None, backward: bool, varlen: bool = False, decode: bool = False,
               options: tuple[str, ...] = ()):
    """verify_spec on one spec: (rows, None), or ([], the message of the attngen error it raised)
    (the message, not the exception: attngen's errors need not survive pickling)."""
    from attngen.errors import AttngenError
    from attngen.verify import verify_spec

    try:
        return verify_spec(spec, dtypes=dtypes, backward=backward, varlen=varlen, decode=decode, options=options), None
    except AttngenError as e:
        return [], str(e)


def verify_all(specs: Iterable[Path], dtypes: list[str] | None, backward: bool, jobs: int = 1,
               varlen: bool = False, decode: bool = False, options: tuple[str, ...] = ()) -> Iterator[tuple]:
    """(rows, error) per spec, in spec order. With jobs > 1 the specs run in up to that many spawned
    worker processes (even one spec: the same path as many), and each result is yielded once it and
    those before it are done; closing the generator early (at an error) cancels the specs not yet
    started. Two workers compiling the same spec at once would race on its cache file: name each
    spec once."""
    specs = [str(s) for s in specs]
    if jobs <= 1:
        for spec in specs:
            yield verify_one(spec, dtypes, backward, varlen, decode, options)
        return
    with ProcessPoolExecutor(max_workers=max(1, min(jobs, len(specs))), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(verify_one, spec, dtypes, backward, varlen, decode, options) for spec in specs]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()
