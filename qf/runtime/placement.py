"""Per-layer backends from a planner `Plan`: one backend per device the plan names, shared by its layers.

The CPU keeps its layers on the numba backend (weights in the mmap); each GPU gets one `TorchBackend`. A mixture
of experts may keep a layer's expert matrices on another device than the layer (`--cpu-moe`): the forward
hands that layer's normed hidden state to the experts' backend and their sum back.
Because the layers of one device share one backend object, the forward pass hands the hidden state across
(`to_host` / `from_host`) only where consecutive units sit on different devices: embedding -> first layer,
between layer ranges, last layer -> output head. torch is imported only when the plan uses a GPU.

    plan = plan_from_file(path, gpu_layers=20)
    p = placement_from_plan(plan)                                  # {"cuda:0": TorchBackend, "cpu": CpuBackend}
    fwd = build_forward(LlamaForward, hp, spec, tensors, p, n_ctx)

Tests run GPU plans on the CPU: device_map={"cuda:0": "cpu"} gives the "GPU" layers a TorchBackend on
torch's CPU device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from qf.format.errors import ModelError
from qf.runtime.planner import Plan

if TYPE_CHECKING:
    from qf.runtime.backend import Backend

HOST = "cpu"  # the plan's name for the host


@dataclass(frozen=True)
class Placement:
    """The backend of every repeating layer, of the embedding lookup and of the output head."""

    layers: tuple[Backend, ...]  # layers[i]: backend of blk.i
    embed: Backend  # token_embd lookup
    head: Backend  # output_norm + output
    devices: Mapping[str, Backend] = field(default_factory=dict)  # plan device name -> its backend
    experts: tuple[Backend, ...] | None = None  # experts[i]: backend of blk.i's ffn_*_exps (None: the layer's)

    @property
    def units(self) -> tuple[Backend, ...]:
        """Backends in the order the hidden state visits them: embedding, layers, head."""
        return (self.embed, *self.layers, self.head)

    def crossings(self) -> int:
        """Device hand-offs of the hidden state in one forward pass."""
        u = self.units
        return sum(a is not b for a, b in zip(u, u[1:]))


def make_backend(device: str, *, device_map: Mapping[str, str] | None = None, n_threads: int | None = None,
                 **torch_options: Any) -> Backend:
    """The backend for one plan device: numba CPU for "cpu", else a TorchBackend on device_map[device]."""
    if device == HOST:
        from qf.runtime.backend import CpuBackend

        return CpuBackend(n_threads)
    target = (device_map or {}).get(device, device)
    try:
        from qf.runtime.backend_torch import TorchBackend
    except ImportError as e:
        raise ModelError(f"the plan puts layers on {device} but torch is not importable ({e}); "
                         "install torch with CUDA, or plan with gpu_layers=0") from e
    return TorchBackend(target, n_threads=n_threads, **torch_options)


def placement_from_plan(plan: Plan, *, device_map: Mapping[str, str] | None = None, n_threads: int | None = None,
                        cpu: Backend | None = None, **torch_options: Any) -> Placement:
    """One backend per device of the plan; `cpu` reuses a host backend; torch_options go to TorchBackend."""
    devices: dict[str, Backend] = {} if cpu is None else {HOST: cpu}
    for name in dict.fromkeys((plan.embd_device, *plan.layer_devices, plan.output_device, *plan.expert_devices)):
        if name not in devices:
            devices[name] = make_backend(name, device_map=device_map, n_threads=n_threads, **torch_options)
    experts = tuple(devices[d] for d in plan.expert_devices) if plan.expert_devices else None
    return Placement(layers=tuple(devices[d] for d in plan.layer_devices), embed=devices[plan.embd_device],
                     head=devices[plan.output_device], devices=devices, experts=experts)


def uniform_placement(n_layer: int, backend: Backend) -> Placement:
    """Every unit on one backend (no crossings)."""
    return Placement(layers=(backend,) * n_layer, embed=backend, head=backend, devices={backend.name: backend})


def build_forward(forward_cls: Callable[..., Any], hp: Any, spec: Any, tensors: Any, placement: Placement,
                  n_ctx: int) -> Any:
    """Construct an architecture's forward pass over a placement (embedding and head on their own devices);
    n_ctx bounds the positions (RoPE tables); caches come from `forward.new_cache(...)`."""
    if len(placement.layers) != hp.n_layer:
        raise ModelError(f"the placement covers {len(placement.layers)} layers but the model has {hp.n_layer}")
    extra = {} if placement.experts is None else {"experts_be": list(placement.experts)}
    return forward_cls(hp, spec, tensors, list(placement.layers), n_ctx, embed_be=placement.embed,
                       head_be=placement.head, **extra)
