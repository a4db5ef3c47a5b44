"""Training data: four common layouts in, one `messages` (or `text`) column out, every row checked.

    from sftlib.data import load_dataset
    train_ds, eval_ds = load_dataset(cfg.data)    # source, split, format, mapping, eval_size, max_rows, shuffle_seed

    # or step by step
    from sftlib.data import load_rows, detect_format, to_messages, split_eval
    rows = load_rows("chats.jsonl", split="train[:1000]")   # a file, a folder, a Hub name, a list of dicts or a Dataset
    detect_format(rows)                                      # "sharegpt"
    ds = to_messages(rows)                                   # one column: [{"role": ..., "content": ...}, ...]
    train_ds, eval_ds = split_eval(ds, eval_size=0.05, seed=0)

One job a module: load.py (files, folders, the Hub), detect.py (which layout), check.py (every row, with
its row number), refuse.py (preference, KTO and tool-calling data, which are not SFT data), convert.py (to
`messages`), split.py (held-out rows), dataset.py (all together);
templates.py renders conversations and encode.py turns them into token ids and loss labels (encode_batch.py
for a whole dataset; encode_cache.py keeps them on disk for the next run on the same data and settings).
Preference pairs (`train.method: dpo | orpo`): pairs.py (layouts, row checks, `load_pairs`) and
encode_pairs.py (the same rendering and mask, per reply).
"""

from sftlib.data.check import MAX_SHOWN
from sftlib.data.convert import MESSAGES_FEATURES, TEXT_FEATURES, to_messages
from sftlib.data.dataset import load_dataset
from sftlib.data.encode import IGNORE, EncodeError, encode_conversation, prompt_ids, render
from sftlib.data.encode_batch import encode_dataset
from sftlib.data.detect import FORMATS, ROLES, DataError, detect_format
from sftlib.data.load import FILE_TYPES, load_rows
from sftlib.data.split import split_eval
from sftlib.data.templates import TEMPLATES, ChatTemplate, get_template

__all__ = ["FILE_TYPES", "FORMATS", "IGNORE", "MAX_SHOWN", "MESSAGES_FEATURES", "ROLES", "TEMPLATES", "TEXT_FEATURES",
           "ChatTemplate", "DataError", "EncodeError", "detect_format", "encode_conversation", "encode_dataset",
           "get_template", "load_dataset", "load_rows", "prompt_ids", "render", "split_eval", "to_messages"]
