"""2 ranks: StrategyBase's collectives, rank-0 print and accumulation under a real gloo group."""

import torch
import torch.distributed as dist

from lightrft_lightning import StrategyBase, StrategyConfig

strategy = StrategyBase(StrategyConfig(train_batch_size=8, micro_train_batch_size=2))
strategy.setup_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
assert world == 2 and strategy.dp_world_size == 2 and strategy.accumulation_steps == 2
assert strategy.is_rank_0() == (rank == 0)

assert strategy.all_reduce(float(rank + 1), op="mean") == 1.5
assert strategy.all_reduce(rank + 1, op="sum") == 3
assert strategy.all_reduce(float(rank), op="max") == 1.0
out = strategy.all_reduce({"t": torch.tensor([rank, 10.0 * rank]), "n": {"x": float(rank)}}, op="sum")
assert torch.equal(out["t"], torch.tensor([1.0, 10.0])) and out["n"]["x"] == 1.0
assert torch.equal(strategy.all_gather(torch.tensor([rank, rank])), torch.tensor([0, 0, 1, 1]))
assert torch.equal(strategy.all_gather(rank * 2), torch.tensor([0, 2]))
strategy.print(f"PRINTED-BY-RANK-{rank}")
dist.barrier()
dist.destroy_process_group()
