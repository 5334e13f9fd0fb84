"""Training under torch DDP and under accelerate needs no special code: 2 CPU processes
(gloo) train one adapter on different data; both ranks end with the same values and the
adapter that rank 0 saves loads back. One spawn runs both (process start-up dominates)."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import OPTConfig, OPTForCausalLM

from shira_export import ShiraConfig, ShiraModel, get_shira_model

WORLD = 2
STEPS = 3


def _tiny_opt() -> OPTForCausalLM:
    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        dropout=0.0,
    )
    return OPTForCausalLM(cfg)


def _values(model: ShiraModel) -> dict[str, torch.Tensor]:
    return {path: layer.shira_weight["default"].detach().clone() for path, layer in model.shira_layers()}


def _train(model, step_fn, rank: int) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    for _ in range(STEPS):
        ids = torch.randint(0, 96, (2, 12), generator=g)
        step_fn(model(input_ids=ids, labels=ids).loss)
        opt.step()
        opt.zero_grad()


def _new_model() -> ShiraModel:
    return get_shira_model(_tiny_opt(), ShiraConfig(r=2, target_modules=["q_proj", "v_proj", "fc2"], random_seed=5))


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        model = _new_model()
        _train(torch.nn.parallel.DistributedDataParallel(model), lambda loss: loss.backward(), rank)
        torch.save(_values(model), os.path.join(out_dir, f"ddp_{rank}.pt"))
        if rank == 0:
            model.save_pretrained(os.path.join(out_dir, "ddp"))

        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
        assert accelerator.num_processes == WORLD
        prepared = accelerator.prepare(_new_model())
        _train(prepared, accelerator.backward, rank)
        model = accelerator.unwrap_model(prepared)
        torch.save(_values(model), os.path.join(out_dir, f"accelerate_{rank}.pt"))
        if accelerator.is_main_process:
            model.save_pretrained(os.path.join(out_dir, "accelerate"))
        dist.barrier()
        open(os.path.join(out_dir, f"done_{rank}"), "w").close()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(out_dir) -> None:
    """Spawn the ranks; once every rank has marked its work done, give them a few seconds
    to exit, then stop them (gloo's destroy_process_group can hang after a peer left)."""
    context = mp.start_processes(
        _worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline, done_since = time.monotonic() + 300, None
    while not context.join(timeout=2):
        if all((out_dir / f"done_{r}").exists() for r in range(WORLD)):
            done_since = done_since or time.monotonic()
        if (done_since and time.monotonic() - done_since > 15) or time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            assert done_since, "DDP workers did not finish within 300 s"
            return


def test_ddp_and_accelerate_two_cpu_ranks_agree_and_adapter_loads(tmp_path):
    _run_workers(tmp_path)
    initial = _values(_new_model())
    for mode in ("ddp", "accelerate"):
        v0 = torch.load(tmp_path / f"{mode}_0.pt")
        v1 = torch.load(tmp_path / f"{mode}_1.pt")
        assert sorted(v0) == sorted(v1) == sorted(initial) and len(v0) == 6
        for path in v0:
            torch.testing.assert_close(v0[path], v1[path], rtol=0, atol=0)
            assert not torch.equal(v0[path], initial[path]), f"{mode}: {path} did not train"
        loaded = ShiraModel.from_pretrained(_tiny_opt(), tmp_path / mode)
        for path, values in _values(loaded).items():
            torch.testing.assert_close(values, v0[path], rtol=0, atol=0)
