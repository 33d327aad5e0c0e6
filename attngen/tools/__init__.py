"""The GPU-session tools behind the command line's subcommands, as small libraries:

    inspect_kernels.py  `attngen inspect`           registers, spills and SASS instruction mix per kernel (also --offline)
    profile_step.py     `attngen profile`           a step's time split into kernels and host, ours against Flex
    ab.py               `attngen bench --ab OPTION` a lowering option (a PassOptions flag) on against off
    merge.py            `attngen bench-merge`       `attngen bench --json` files merged into one JSON and one table
    jobs.py             `attngen verify --jobs N`   verify's per-spec work, run in worker processes

One-off investigations live in experiments/ (not a package), each with the Triton version and GPU
it ran on.
"""
