"""
The plumbing that train_gpt2.py, its extensions and the scripts share; none of it is the lecture's
path, and none of it imports a file of the root (imports run one way: the root uses support/).

    cli.py          flags made from a settings dataclass, range checks, one-line errors
    files.py        atomic writes, and the temporaries a killed writer leaves
    datafiles.py    GPT-2's tokenizer, token shards, the bundled corpus, HellaSwag's files
    devices.py      the device: its dtype, peak FLOP/s and memory, the micro-batch that fits
    checkpoints.py  checkpoint files: names, the newest, atomic and sharded writes, reads, RNGs
    rundir.py       a run's directory: log.txt, run.json and the rules that keep runs apart
    run_control.py  stop requests, and what the ranks of a run decide together
    hf_gpt2.py      GPT-2 in Hugging Face's transformers: the presets, the mapping both ways

Importing any of them does no work. cli, files, datafiles and hf_gpt2 import without torch (and
hf_gpt2 without transformers, until it loads or writes a model), so fineweb.py runs without it.
"""

import os

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # data/, the checkout
