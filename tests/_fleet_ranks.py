"""The ranks of the fleet test: a BERT-base-sized model built from its config on every rank of a
gloo process group, compared with each other through faults one rank at a time."""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import torch
import torch.distributed as dist

import torchwatch as tw
from torchwatch.distributed import compare_replicas

SDC_MODULE = "encoder.layer.3.output.dense"


def bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(attn_implementation="eager")).eval()  # BERT-base: 12 layers, hidden 768


def run(rank: int, world: int, port: int, canary_path: str, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = bert()
    if rank == 0:
        ids = torch.randint(1000, 5000, (2, 16), generator=torch.Generator().manual_seed(1))
        tw.Canary.record(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}).save(canary_path)
    dist.barrier()
    canary = tw.Canary.load(canary_path)
    watch = tw.attach(model, replica=f"replica-{rank}", rules=[])
    out: dict[str, Any] = {}

    def compare(name: str, on: torch.nn.Module, timeout: float = 60.0) -> None:
        start = time.perf_counter()
        report = compare_replicas(on, canary, timeout=timeout)
        print(f"rank {rank}: {name} in {time.perf_counter() - start:.1f} s", flush=True)
        out[name] = {"findings": [f.to_dict() for f in report.findings], "seconds": time.perf_counter() - start,
                     "ok": report.ok, "answered": report.answered}  # fmt: skip

    compare("agree", model)
    word = model.encoder.layer[5].attention.self.query.weight.view(-1).view(torch.int32)
    if rank == 2:  # one flipped bit in one weight
        word[12345] ^= 1 << 3
    compare("bit", model)
    if rank == 2:
        word[12345] ^= 1 << 3

    def sdc(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output.view(-1)[77] += 1e-3  # a device computing one activation slightly wrong
        return output

    hook = model.get_submodule(SDC_MODULE).register_forward_hook(sdc) if rank == 1 else None
    compare("sdc", model)
    if hook is not None:
        hook.remove()
    compare("dtype", copy.deepcopy(model).to(torch.bfloat16) if rank == 3 else model)
    if rank == 3:
        torch.set_num_threads(2)
    compare("threads", model)
    torch.set_num_threads(1)
    out["healthy"] = watch.healthy
    out["alerts"] = [a.message for a in watch.alerts if a.rule == "replica"]
    out["calls"] = watch.calls
    if rank == 3:  # dies before the next comparison (its result sent first)
        results.put((rank, out))
        results.close()
        results.join_thread()
        os._exit(0)
    compare("dead", model, timeout=10.0)
    results.put((rank, out))
    watch.detach()
