"""One verl actor update with loss_mode=vespo, through verl 0.9.1's own worker code, on CPU.

Run by .ci/install_checks.sh in a fresh venv holding vespo's base install next to verl==0.9.1 and
its real dependencies (hydra-core included). What it proves, in order:

1. ``import verl`` alone registers vespo's losses: verl loads the ``verl.plugins`` entry point
   that vespo's pyproject declares, and ``get_policy_loss_fn("vespo")`` returns vespo's function.
2. verl's real ``ppo_trainer`` config, composed with hydra and the overrides of
   docs/integrations.md (``policy_loss._target_=vespo.integrations.verl.VespoPolicyLossConfig``,
   ``loss_mode=vespo``, ``+...policy_loss.vespo.k_pos=...``), gives an actor config whose
   policy_loss carries the vespo parameters.
3. verl's actor worker (``verl.workers.engine_workers.ActorRolloutRefWorker``, role ``actor``)
   builds a tiny random ``LlamaForCausalLM`` with its FSDP2 engine (``init_model``), and
   ``update_actor`` -- the call verl's trainer makes in ``RayPPOTrainer._update_actor``, with the
   same batch preparation -- runs one optimizer step through ``ppo_loss`` ->
   ``get_policy_loss_fn("vespo")``. Checked: loss finite, parameters changed, vespo's phi metrics
   present.

CPU: verl 0.9.1 has no CPU platform. On a machine without a GPU its platform detection falls back
to NVIDIA, so ``verl.utils.device.get_device_name()`` returns "cuda" and the worker would call
``torch.cuda`` (``current_device``, ``max_memory_allocated``, ...) and ask for an NCCL process group.
The only change made here is verl's own platform hook: ``verl.plugin.platform.set_platform`` with a
platform whose device is "cpu" and whose backend is gloo (``CPUPlatform`` below), plus
``VERL_ENGINE_DEVICE=cuda`` (verl's own override) so that the engine registry, which lists the FSDP
engine only for cuda/npu, still picks that engine. verl's code itself is not patched. The 1-process
gloo group is created by verl (``initialize_global_process_group_ray``) from RANK/WORLD_SIZE/
MASTER_ADDR/MASTER_PORT, as under Ray.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import tempfile
import types


def fail(msg: str) -> None:
    print(f"verl_update_check: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A single-process "cluster", as a Ray worker would see it.
os.environ.update(
    RANK="0",
    WORLD_SIZE="1",
    LOCAL_RANK="0",
    LOCAL_WORLD_SIZE="1",
    MASTER_ADDR="127.0.0.1",
    MASTER_PORT=str(free_port()),
    VERL_ENGINE_DEVICE="cuda",  # engine registry key: FSDPEngineWithLMHead is registered for cuda/npu
    TOKENIZERS_PARALLELISM="false",
)
os.environ.pop("VERL_USE_EXTERNAL_MODULES", None)  # the entry point alone must do it

# --- 1. the plugin entry point registers the losses on `import verl` ----------------------------
if "vespo.integrations.verl" in sys.modules:
    fail("vespo.integrations.verl imported before verl")
import verl  # noqa: E402

if "vespo.integrations.verl" not in sys.modules:
    fail("`import verl` did not load vespo's verl.plugins entry point")
from verl.trainer.ppo.core_algos import get_policy_loss_fn  # noqa: E402

import vespo.integrations.verl as vespo_verl  # noqa: E402  (already imported by verl)

fn = get_policy_loss_fn("vespo")
if getattr(fn, "_vespo_loss_name", None) != "vespo":
    fail(f"get_policy_loss_fn('vespo') is {fn!r}, not vespo's loss")
print(
    f"verl {verl.__version__}: get_policy_loss_fn('vespo') -> {fn.__module__}.{fn.__name__} "
    f"({len(vespo_verl.REGISTERED)} vespo loss modes registered by the entry point)"
)

# --- CPU platform (the one thing verl 0.9.1 lacks on a GPU-less machine) -------------------------
import torch  # noqa: E402
from verl.plugin.platform import platform_manager  # noqa: E402
from verl.plugin.platform.platform_cuda import PlatformCUDA  # noqa: E402

CALLED: set[str] = set()  # the device-module calls verl made (printed at the end)


class _CPUDeviceModule(types.ModuleType):
    """What verl calls on ``get_torch_device()``; memory statistics are 0 on CPU."""

    def __init__(self) -> None:
        super().__init__("vespo_ci_cpu_device")

    def __getattr__(self, name):
        if not name.startswith("__"):
            CALLED.add(name)
        if name == "mem_get_info":
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            return lambda *a, **k: (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), total)
        if name.startswith(("max_memory", "memory_")):
            return lambda *a, **k: 0
        if name in ("empty_cache", "synchronize", "set_device", "reset_peak_memory_stats"):
            return lambda *a, **k: None
        if name == "is_available":
            return lambda: True
        if name == "device_count":
            return lambda: 1
        if name == "get_device_name":
            return lambda *a, **k: "CPU"  # verl's flops counter then uses its CPU entry
        if name == "current_device":
            return lambda: "cpu"
        if name in ("manual_seed", "manual_seed_all"):
            return torch.manual_seed
        return getattr(torch.cpu, name)


class CPUPlatform(PlatformCUDA):
    device_name = "cpu"
    _module = _CPUDeviceModule()

    @property
    def device_module(self):
        return self._module

    def is_available(self) -> bool:
        return True

    def current_device(self):
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index) -> None:
        pass

    def synchronize(self, device_index=None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def communication_backend_name(self) -> str:
        return "gloo"

    def get_device_capability(self, device_index=0):
        return None, None


platform_manager.set_platform(CPUPlatform())
from verl.utils.device import get_device_name  # noqa: E402

assert get_device_name() == "cpu"

# --- 2. verl's own config, composed by hydra with the documented overrides ----------------------
from hydra import compose, initialize_config_dir  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

torch.manual_seed(0)
work = tempfile.mkdtemp(prefix="vespo-verl-check-")
model_dir = os.path.join(work, "tiny-llama")
LlamaForCausalLM(
    LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
).save_pretrained(model_dir)

K_POS = 2.5
overrides = [
    f"actor_rollout_ref.model.path={model_dir}",
    "+actor_rollout_ref.model.load_tokenizer=False",
    "actor_rollout_ref.model.use_remove_padding=False",
    "actor_rollout_ref.model.enable_gradient_checkpointing=False",
    "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
    "actor_rollout_ref.actor.strategy=fsdp2",
    "actor_rollout_ref.actor.ppo_mini_batch_size=8",  # the whole batch: one optimizer step
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",  # 4 micro-batches, accumulated
    "actor_rollout_ref.actor.use_dynamic_bsz=False",
    "actor_rollout_ref.actor.optim.lr=1e-2",
    "actor_rollout_ref.actor.loss_agg_mode=token-mean",
    "actor_rollout_ref.actor.use_kl_loss=False",
    "actor_rollout_ref.actor.entropy_coeff=0",
    "actor_rollout_ref.actor.policy_loss._target_=vespo.integrations.verl.VespoPolicyLossConfig",
    "actor_rollout_ref.actor.policy_loss.loss_mode=vespo",
    f"+actor_rollout_ref.actor.policy_loss.vespo.k_pos={K_POS}",
    "+actor_rollout_ref.actor.policy_loss.vespo.lambda_pos=3.0",
    "actor_rollout_ref.rollout.n=1",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=False",
]
config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
with initialize_config_dir(config_dir=config_dir, version_base=None):
    cfg = compose(config_name="ppo_trainer", overrides=overrides)

from verl.utils.config import omega_conf_to_dataclass  # noqa: E402

actor_cfg = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
if type(actor_cfg.policy_loss) is not vespo_verl.VespoPolicyLossConfig:
    fail(f"actor.policy_loss is {type(actor_cfg.policy_loss).__name__}, not VespoPolicyLossConfig")
if vespo_verl.loss_params("vespo", actor_cfg)["k_pos"] != K_POS:
    fail("the vespo.k_pos override did not reach the loss parameters")
print(f"hydra: {type(actor_cfg).__name__}.policy_loss = VespoPolicyLossConfig, vespo k_pos={K_POS} arrives")

# --- 3. verl's actor worker: init_model + update_actor (one optimizer step) ---------------------
from verl import DataProto  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.model import compute_position_id_with_mask  # noqa: E402
from verl.workers.engine_workers import ActorRolloutRefWorker  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

# verl's initialize_global_process_group_ray (called in TrainingWorker.__init__) would ask for the
# backend "cpu:gloo,<device>:<backend>", i.e. "cpu:gloo,cpu:gloo" here, which torch rejects as a
# duplicate; so the 1-process gloo group is created first, and verl reuses it.
torch.distributed.init_process_group(backend="gloo", rank=0, world_size=1)
worker = ActorRolloutRefWorker(config=cfg.actor_rollout_ref, role="actor")
worker.init_model()
module = worker.actor.engine.module
from torch.distributed.fsdp import FSDPModule  # noqa: E402

if not isinstance(module, FSDPModule):
    fail(f"the engine's module is {type(module).__name__}, not an FSDP2 module")
loss_cfg = worker.loss_fn.keywords["config"]  # partial(ppo_loss, config=actor_config), engine_workers.py
if loss_cfg.policy_loss.loss_mode != "vespo" or loss_cfg.policy_loss.vespo.get("k_pos") != K_POS:
    fail(f"the worker's loss config is {loss_cfg.policy_loss}")
before = {n: p.detach().clone() for n, p in module.named_parameters()}

B, P, R = 8, 6, 10  # sequences, prompt length, response length
g = torch.Generator().manual_seed(1)
prompts = torch.randint(0, 64, (B, P), generator=g)
responses = torch.randint(0, 64, (B, R), generator=g)
prompt_mask = torch.ones(B, P, dtype=torch.long)
prompt_mask[:2, :2] = 0  # left padding
response_mask = torch.ones(B, R, dtype=torch.long)
for i, n in enumerate([10, 7, 10, 4, 9, 10, 6, 8]):  # right padding
    response_mask[i, n:] = 0
attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
input_ids = torch.cat([prompts, responses], dim=1) * attention_mask
# Behaviour log-probs a little off the current policy, so the importance weights are not 1.
old_log_probs = (-math.log(64) + 0.3 * torch.randn(B, R, generator=g)) * response_mask
advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.8, -0.8]).unsqueeze(1).expand(B, R) * response_mask
batch = DataProto.from_single_dict(
    {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": compute_position_id_with_mask(attention_mask),
        "prompts": prompts,
        "responses": responses,
        "response_mask": response_mask,
        "old_log_probs": old_log_probs.float(),
        "advantages": advantages.float(),
    },
    meta_info={"temperature": 1.0, "multi_turn": False, "global_token_num": attention_mask.sum(-1).tolist()},
)
# The preparation of RayPPOTrainer._update_actor (verl/trainer/ppo/ray_trainer.py), verbatim in effect.
batch_td = left_right_2_no_padding(batch.to_tensordict())
tu.assign_non_tensor(
    batch_td,
    calculate_entropy=False,
    distillation_use_topk=False,
    distillation_only=False,
    global_batch_size=B,  # ppo_mini_batch_size * rollout.n
    mini_batch_size=B,
    epochs=1,
    seed=42,
    dataloader_kwargs={"shuffle": False},
    compute_loss=True,
)
output = worker.update_actor(batch_td)
metrics = tu.get(output, "metrics")

changed = sum(not torch.equal(before[n], p.detach()) for n, p in module.named_parameters())
loss_values = metrics.get("loss", [])  # one value per mini-batch (= optimizer step)
loss_values = [float(v) for v in (loss_values if isinstance(loss_values, list) else [loss_values])]
phi_keys = sorted(k for k in metrics if k.startswith("actor/vespo/phi_"))
print(
    f"update_actor ({type(module).__name__}, 4 micro-batches): loss {loss_values}, "
    f"{changed}/{len(before)} parameter tensors changed, phi metrics {phi_keys}, actor/vespo/phi_mean {metrics.get('actor/vespo/phi_mean')}"
)
if len(loss_values) != 1:
    fail(f"expected one optimizer step, got losses {loss_values}")
if not loss_values or not all(math.isfinite(v) for v in loss_values):
    fail(f"loss is not finite: {loss_values}")
if changed == 0:
    fail("no parameter changed")
if "actor/vespo/phi_mean" not in metrics:
    fail(f"vespo's phi metrics are missing; metric keys: {sorted(metrics)}")
torch.distributed.destroy_process_group()
print(f"device calls verl made on get_torch_device() (answered for CPU): {', '.join(sorted(CALLED))}")
print("verl_update_check: ok")
