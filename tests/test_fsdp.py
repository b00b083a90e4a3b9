"""Sharded training (``trainer.strategy: fsdp``): two real processes (gloo on the CPU, launched
by Lightning) hold half the UNet and half its EMA each, take the same steps as DDP, write a
whole checkpoint that resumes, and export model.pt as the gathered EMA; unsupported
combinations are refused by name before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import imagen, make_project

from imagen.checkpoint import load_stage, read_stage
from imagen.config import ConfigError, resolve_params


def _train(root: Path, out: str, steps: int, *extra: str) -> str:
    sets = {"accelerator": "cpu", "devices": 2, "batch_size": 4, "max_steps": steps,
            "checkpoint_every_n_steps": 2, "sample_every_n_steps": 2}  # fmt: skip
    args = [a for k, v in sets.items() for a in ("-S", f"stages.base64.trainer.{k}={v}")]
    res = imagen(root, "train", "--stage", "base64", "--out", out, *args, *extra, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:]
    return res.stdout


@pytest.mark.slow
def test_fsdp_trains_resumes_and_exports_the_gathered_ema(tmp_path: Path) -> None:
    make_project(tmp_path, stages=("base64",))
    fsdp = "-S", "stages.base64.trainer.strategy=fsdp"
    _train(tmp_path, "models/fsdp", 2, "--record-keys", *fsdp)
    out = tmp_path / "models" / "fsdp"
    total = json.loads((out / "metrics.json").read_text())["parameters"]
    ranks = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for key in ("parameters_held", "ema_parameters_held"):  # each rank holds its shard
        held = [r[key] for r in ranks]
        assert sum(held) >= total and max(held) < 0.6 * total, (key, held, total)
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])  # data parallel
    first = torch.load(out / "checkpoints/last.ckpt", weights_only=True)
    assert first["global_step"] == 2  # a whole checkpoint: every key, unsharded
    assert {k for k in first["state_dict"] if k.startswith("denoiser.net.")} == {
        "denoiser.net." + k for k in read_stage(out / "model.pt")[1]
    }
    assert (out / "samples" / "step_0000002.png").is_file()  # rank zero sampled a grid

    log = _train(tmp_path, "models/fsdp", 3, *fsdp)  # resumes the sharded run
    assert "(step 2)" in log, log[-3000:]
    last = torch.load(out / "checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 3 and int(last["state_dict"]["ema.n_averaged"]) == 3
    ema = {k[len("ema.module.") :]: v for k, v in last["state_dict"].items()
           if k.startswith("ema.module.")}  # fmt: skip
    _, state, info = read_stage(out / "model.pt")
    assert info["step"] == 3 and state.keys() == ema.keys()
    for k, v in ema.items():
        assert torch.equal(state[k], v), k  # model.pt is the gathered EMA
    net, _ = load_stage(out / "model.pt")  # what `imagen sample` loads
    assert sum(p.numel() for p in net.parameters()) == total


@pytest.mark.parametrize(
    ("trainer", "model", "named"),
    [
        ({"precision": "16-mixed"}, {}, "trainer.precision 16-mixed"),
        ({}, {"inductor": True}, "model.inductor"),
    ],
)
def test_fsdp_with_an_unsupported_setting_is_refused_by_name(
    trainer: dict, model: dict, named: str
) -> None:
    stage = {"model": {"preset": "small_res_64", **model},
             "trainer": {"strategy": "fsdp", **trainer}}  # fmt: skip
    with pytest.raises(ConfigError, match=rf"stages\.base64.*trainer\.strategy fsdp.*{named}"):
        resolve_params({"stages": {"base64": stage}})


def test_an_unknown_strategy_is_refused_by_name() -> None:
    stage = {"model": {"preset": "small_res_64"}, "trainer": {"strategy": "fdsp"}}
    with pytest.raises(ConfigError, match=r"stages\.base64\.trainer\.strategy.*'fsdp'"):
        resolve_params({"stages": {"base64": stage}})


class _Blocks(torch.nn.Module):
    """A stand-in UNet: a list of blocks (the units shard_unet wraps) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(2))
        self.head = torch.nn.Linear(6, 3)
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.head(x) * self.scale


def _sharded_steps(rank: int, port: int, folder: str) -> None:
    import copy
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.optim.swa_utils import AveragedModel

    from imagen.train.module import broadcast_from_zero, shard_unet, update_ema

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    torch.manual_seed(rank)  # each rank its own initialisation, as under Lightning
    net = _Blocks()
    ema = AveragedModel(net, use_buffers=True)
    first = copy.deepcopy(net.state_dict())
    broadcast_from_zero(net, ema.module, device=torch.device("cpu"))
    mesh = init_device_mesh("cpu", (2,))
    shard_unet(net, mesh)
    shard_unet(ema.module, mesh)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(7)
    for _ in range(3):
        x = torch.randn(4, 6, generator=data)  # the whole batch; this rank takes its half
        net(x[rank * 2 : rank * 2 + 2]).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        update_ema(ema, net, 0.5)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {"first": first, "net": get_model_state_dict(net, options=options),
             "ema": get_model_state_dict(ema.module, options=options),
             "held": sum(p.to_local().numel() for p in ema.module.parameters())}  # fmt: skip
    torch.save(state, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def test_sharded_ranks_start_from_rank_zero_and_average_their_shards(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp
    from torch.optim.swa_utils import AveragedModel

    from imagen.train.module import update_ema

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_sharded_steps, args=(port, str(tmp_path)), nprocs=2,
                       start_method="spawn")  # fmt: skip
    zero, one = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert zero["held"] + one["held"] == 6 * 6 * 2 + 6 * 2 + 3 * 6 + 3 and one["held"] < 70
    assert one["net"] == {}  # gathered on rank zero only
    # the same three steps unsharded, from rank zero's initialisation, on the whole batches
    net = _Blocks()
    net.load_state_dict(zero["first"])
    ema = AveragedModel(net, use_buffers=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(7)
    for _ in range(3):
        x = torch.randn(4, 6, generator=data)
        loss = (net(x[:2]).pow(2).mean() + net(x[2:]).pow(2).mean()) / 2  # DDP's mean
        loss.backward()
        opt.step()
        opt.zero_grad()
        update_ema(ema, net, 0.5)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(zero["net"][k], v, msg=k)
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(zero["ema"][k], v, msg=k)
    assert not torch.equal(zero["first"]["head.weight"], one["first"]["head.weight"])
