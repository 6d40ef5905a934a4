"""Task experts: stacked experts, routing, router losses and multi-task MoE architectures.

* ``experts``  — ``MLPExperts``, ``LNSExperts`` (parameters with a leading ``expert`` axis)
* ``routing``  — gates, top-k, capacity, dispatch/combine, ``Router``/``MultiGateRouter``/
  ``TaskConditionedRouter``
* ``layer``    — ``SparseMoE`` (token-routed top-k layer, dense-dispatch reference)
* ``losses``   — load-balancing (micro/global batch), CV², z-loss
* ``gated``    — ``GatedExpertLayer`` (masked multi-gate layer behind MMoE/CGC/PLE/HoME)
* ``architectures`` — ``OneGateMoE, MMoE, CGC, PLE, HoME``, ``ARCHITECTURES``
* ``model``    — ``MoEMultiTaskModel`` (architecture + task heads), ``build_moe_model``
* ``parallel`` — expert parallelism (``shard_map``, all-to-all, ``ragged_dot``) and the
  capacity-buffer dispatch (``SparseMoE(impl="dense"|"shard_map"|"capacity")``)
* ``vit``      — ``M3ViT`` (task-routed sparse MoE ViT), ``extract_task_model``, ``used_experts``
* ``taskexpert`` — ``TaskExpertViT`` (experts + per-task gates + per-task feature memory)
* ``diagnostics`` — expert load, router entropy, task shares, per-domain routing
"""
from mtl.nn.moe.architectures import ARCHITECTURES, CGC, HoME, MMoE, OneGateMoE, PLE, build_architecture
from mtl.nn.moe.experts import EXPERTS, LNSExperts, MLPExperts, build_experts, check_expert_count
from mtl.nn.moe.gated import GatedExpertLayer
from mtl.nn.moe.layer import SparseMoE
from mtl.nn.moe.losses import (accumulated_load_balancing_loss, cv_squared, expert_counts, importance,
                               importance_load_loss, load_balancing_loss, micro_batch_load_balancing_loss,
                               router_z_loss, routing_stats, smooth_load)
from mtl.nn.moe.model import MoEMultiTaskModel, build_moe_model, gate_diagnostics
from mtl.nn.moe.routing import (ROUTERS, MultiGateRouter, Router, Routing, TaskConditionedRouter, add_gating_noise,
                                assignment_slots, check_task_ids, combine, dispatch, dispatch_and_combine,
                                expert_capacity, route, scatter_gates, softmax_gate, top_k)
from mtl.nn.moe.diagnostics import (domain_expert_mutual_information, domain_routing, expert_load, load_entropy,
                                    router_entropy, task_expert_share, zero_fraction)
from mtl.nn.moe.parallel import capacity_ffn, check_expert_parallel, expert_parallel_ffn
from mtl.nn.moe.taskexpert import TaskExpertLayer, TaskExpertViT
from mtl.nn.moe.vit import M3ViT, MoEBlock, extract_task_model, m3vit_flops, used_experts
