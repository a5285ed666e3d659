"""One process of tests/test_headtrain.py's distributed test (not a test module itself).

Run as ``python -m torch.distributed.run --nproc_per_node=2 --standalone ddp_worker.py SETUP
OUT``: every process joins a gloo process group, rebuilds the backbone and the heads from
SETUP (a torch file written by the test: configs, state dicts, shortlist, one feature-cache
folder per rank), trains the heads on its own shard with ``cptoy.headtrain.train_heads`` (which
wraps them in DistributedDataParallel) and saves the heads' state dict and loss history:
rank 0 to OUT, rank r > 0 to OUT.rank<r>.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from cptoy.features import FeatureCache
from cptoy.headtrain import HeadTrainConfig, build_heads_model, train_heads
from cptoy.model import GPT, GPTConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("setup")
    p.add_argument("out")
    a = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        setup = torch.load(a.setup, weights_only=True)
        if world != len(setup["caches"]):
            raise SystemExit(f"{len(setup['caches'])} cache shards for {world} processes")
        backbone = GPT(GPTConfig(**setup["backbone_config"])).eval()
        backbone.load_state_dict(setup["backbone"])
        model = build_heads_model(backbone, setup["kind"], setup["n_future"], setup["rank"],
                                  setup["expert_dim"])
        model.heads.load_state_dict(setup["heads"])
        cache = FeatureCache.open(setup["caches"][rank])
        hist = train_heads(model, cache, HeadTrainConfig(**setup["config"]), setup["shortlist"],
                           progress=False)
        out = a.out if rank == 0 else f"{a.out}.rank{rank}"
        torch.save(dict(heads=model.heads.state_dict(), loss=hist["loss"], world=world), out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
