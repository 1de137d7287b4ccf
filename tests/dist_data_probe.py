"""Run under torchrun by test_distributed.py: which samples does each rank see in one epoch?

    dist_data_probe.py DATA OUT_DIR WORKERS [shards]
"""

import hashlib
import json
import sys
from pathlib import Path

from accelerate import Accelerator
from transformers import CLIPTokenizer

from lcm_lora.config import DataArgs
from lcm_lora.data import load_source, make_dataloader
from lcm_lora.data.shards import make_shard_dataloader
from lcm_lora.trainer import cpu_processes
from lcm_lora.world import assets

data_dir, out = sys.argv[1], Path(sys.argv[2])
accelerator = Accelerator(cpu=cpu_processes())  # as the trainer makes it
tokenizer = CLIPTokenizer.from_pretrained(assets.resolve("teacher-eps") / "tokenizer")
workers, shards = int(sys.argv[3]), sys.argv[4:] == ["shards"]
if shards:  # a shard stream splits itself by rank, as the trainer uses it
    args = DataArgs(train_shards_path_or_url=data_dir, resolution=64, dataloader_num_workers=workers)
    loader = make_shard_dataloader(args, tokenizer, 2, 0, accelerator.process_index, accelerator.num_processes)
else:
    args = DataArgs(train_data_dir=data_dir, resolution=64, dataloader_num_workers=workers)
    loader = accelerator.prepare(make_dataloader(load_source(args), tokenizer, args, batch_size=2, seed=0))
seen = [hashlib.sha1(pixels.numpy().tobytes()).hexdigest() for batch in loader for pixels in batch["pixel_values"]]
(out / f"rank{accelerator.process_index}.json").write_text(json.dumps(seen))
accelerator.wait_for_everyone()  # then tear the process group down together, as the trainer does
accelerator.end_training()
