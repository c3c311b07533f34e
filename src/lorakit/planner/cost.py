"""The planner's formulas: training memory, FLOPs and time (serving cost and ROI: lorakit.planner.roi).

Memory (bytes, per GPU)
- Weights by dtype: 2 bytes/param in bf16, 4 in fp32; QLoRA stores the linear weights inside the blocks
  in NF4: 4 bits + one fp32 absmax per 64 weights = 4.5 bits, or with double quantization (absmax in
  8 bits per 64, fp32 constants per 256 blocks) 4 + 8/64 + 32/(64*256) = 4.127 bits (Dettmers et al.
  2023, arXiv:2305.14314, section 3); embeddings, norms and the output head stay 16-bit.
- Trainable parameters only carry gradients and AdamW states (m, v: 8 bytes; AdamW is the trainer's
  only optimizer, so 8-bit Adam is not planned). Full fine-tuning in mixed precision keeps bf16 weights
  + bf16 grads + an fp32 master copy + fp32 m and v = 2 + 2 + 4 + 4 + 4 = 16 bytes/param (Rajbhandari
  et al. 2020, ZeRO, arXiv:1910.02054, section 3.1). Adapters are kept in fp32 under autocast (PEFT's default): 4 + 4 + 8.
- Activations: a per-token tally of the tensors autograd saves, following Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models", arXiv:2205.05198, section 4.1):
  for a GPT layer with 16-bit activations, dropout and standard attention it gives sbh(34 + 5as/h)
  bytes; the same tally generalised to grouped-query attention, SwiGLU, RMSNorm, memory-efficient
  (SDPA/Flash) attention that keeps no s x s matrix, and a frozen base (whose linears need no saved
  input unless an adapter reads it). With gradient checkpointing each layer keeps only its input
  (2sbh in 16-bit, the paper's "full recomputation"), plus one layer's activations during recompute.
- Plus the loss, the backward's transient gradient buffers, and the framework overhead of the GPU table.
  The loss (``Setup.loss``): ``chunked`` is lorakit train's (``lorakit.train.loss``): only the hidden
  rows of target tokens reach the head (counted as every token: the planner does not know the prompt
  share), fp32 cross-entropy in chunks of ``CHUNK_LOGITS`` logits. A frozen head takes the rows'
  gradient in forward (it keeps h per token; one chunk's logits, overwritten by their gradient, and one
  block of ``BLOCK_LOGITS`` fp32 log-softmax in flight); a
  trained head recomputes every chunk but the last in backward (it keeps the rows and one chunk's fp32
  log-softmax; a chunk's logits and gradients in flight). Nothing vocabulary-sized per token. ``full`` is the
  Hugging Face loss (``model(..., labels=...).loss``, e.g. under the HF Trainer): the logits of every
  position are returned and their fp32 log-softmax kept (vocab x (p + 4) bytes per token).
- K GPUs run as ``lorakit train`` does under torchrun (``training.distributed``):
  DDP: every GPU holds the whole model, its gradients and optimizer states, plus DDP's gradient buckets, a
  flat copy of the trainable gradients (``gradient_as_bucket_view`` off, PyTorch's default; its docs: setting
  it "saves" memory "equal to the total gradients size"). More GPUs cut time, never memory per GPU.
  FSDP (PyTorch's FSDP2, ``fully_shard`` per decoder block, then the root): weights (NF4 storage included),
  gradients and optimizer states split K ways (ZeRO-3, Rajbhandari et al. 2020), plus the parameters
  gathered in flight: the root's own (embeddings, final norm, output head: FSDP2 keeps the root unsharded
  from forward to backward) and two blocks (the one computing and the one prefetched), in their storage
  dtype. Activations are not sharded.

Compute (per token)
- Forward = 2 N_mm + attention (4 L s d_attn for QK^T and AV; half of it for causal kernels that skip
  the masked blocks) (Kaplan et al. 2020, Chowdhery et al. 2022 appendix B).
- Full fine-tuning: 3x forward (the "6N" rule). LoRA with a frozen base: forward + input-gradient
  backward = 4 N_mm + 3 attention + 6 N_adapter (the adapters' own weight gradients), about 4N.
  Gradient checkpointing adds one more forward. Time = FLOPs / (GPUs x peak x MFU).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

from lorakit.methods import setups
from lorakit.planner.arch import HEADS, Arch, Matrix, PlanError, count_params, matrices, module_infos
from lorakit.planner.gpus import Gpu

GIB = 2**30
PRECISIONS = ("bf16-mixed", "fp32")
ATTENTIONS = ("sdpa", "eager")  # "sdpa": memory-efficient/Flash, no s x s matrix; "eager": keeps it
OPTIMIZERS = {"adamw": 8}  # optimizer -> state bytes per trainable param: exactly what lorakit train runs
DISTRIBUTED = ("ddp", "fsdp")  # multi-GPU strategies lorakit train runs (training.distributed)
LOSSES = ("chunked", "full")  # lorakit train's chunked cross-entropy | the model's own full-logits loss
CHUNK_LOGITS = 1 << 24  # logits per chunk of the chunked loss: lorakit.train.loss.CHUNK_LOGITS (a test)
BLOCK_LOGITS = 4_000_000  # a frozen head's row blocks: lorakit.train.loss.BLOCK_LOGITS
NF4_BITS = {True: 4 + 8 / 64 + 32 / (64 * 256), False: 4 + 32 / 64}
DEFAULT_MFU = 0.35  # assumption: model FLOPs utilisation of a well-configured single-node fine-tune
# assumption: throughput relative to LoRA at the same FLOPs. QLoRA dequantizes every base weight per
# matmul; DoRA's extra elementwise passes were measured 1.10x slower than LoRA here (REFERENCE.md).
METHOD_EFFICIENCY = {"full": 1.0, "lora": 1.0, "qlora": 0.75, "dora": 1 / 1.10}
# The setups the planner prices: the registry's (lorakit.methods.setups: methods, "full", "qlora") that
# the formulas here cover.
METHODS = tuple(m for m in setups() if m in METHOD_EFFICIENCY)


@dataclass(frozen=True)
class Setup:
    """How training runs. ``targets`` follows AdapterConfig.target_modules (None: query/value)."""

    method: str = "lora"
    r: int = 8
    targets: str | tuple[str, ...] | None = None
    seq_len: int = 512
    micro_batch: int = 4
    precision: str = "bf16-mixed"
    grad_checkpointing: bool = True
    attention: str = "sdpa"  # one of ATTENTIONS
    optimizer: str = "adamw"
    distributed: str = "ddp"  # how K > 1 GPUs train; see DISTRIBUTED
    adapter_dtype: str | None = None  # "fp32" | "bf16"; default fp32, bf16 for qlora (QLoRA's scripts)
    lora_dropout: float = 0.0
    double_quant: bool = True
    loss: str = "chunked"  # one of LOSSES: lorakit train's; "full" for a model's own loss (HF Trainer)

    def __post_init__(self) -> None:
        checks = [
            ("method", self.method, METHODS),
            ("precision", self.precision, PRECISIONS),
            ("attention", self.attention, ATTENTIONS),
            ("optimizer", self.optimizer, tuple(OPTIMIZERS)),
            ("distributed", self.distributed, DISTRIBUTED),
            ("adapter_dtype", self.adapter_dtype, (None, "fp32", "bf16")),
            ("loss", self.loss, LOSSES),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise PlanError(f"{name}={value!r} is not supported; expected one of {list(allowed)}")
        for name in ("r", "seq_len", "micro_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise PlanError(f"{name}={value!r} must be a positive integer")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise PlanError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")

    @property
    def act_bytes(self) -> int:
        return 2 if self.precision == "bf16-mixed" else 4

    @property
    def adapter_bytes(self) -> int:
        dtype = self.adapter_dtype or ("bf16" if self.method == "qlora" else "fp32")
        return 2 if dtype == "bf16" else 4

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.micro_batch


@functools.lru_cache(maxsize=256)
def adapted_matrices(arch: Arch, setup: Setup) -> tuple[tuple[Matrix, int], ...]:
    """(matrix, rank) for each matrix an adapter is put on, by lorakit's own target matching."""
    if setup.method == "full":
        return ()
    from lorakit.config import AdapterConfig
    from lorakit.surgery.targets import match_targets

    cfg = AdapterConfig(
        method="dora" if setup.method == "dora" else "lora",
        r=setup.r,
        target_modules=setup.targets,
        dropout=setup.lora_dropout,
    )
    names = set(match_targets(module_infos(arch), cfg, head_names=HEADS))
    return tuple((m, cfg.rank_for(m.name)) for m in matrices(arch) if m.name in names)


def trainable_params(arch: Arch, setup: Setup) -> int:
    """Full: every parameter. LoRA: r(d + k) per adapted (d x k) weight (Hu et al. 2021, section 4);
    DoRA adds a magnitude vector of d per weight; a classification head trains in full."""
    if setup.method == "full":
        return count_params(arch).total
    n = sum(r * (m.d_in + m.d_out) for m, r in adapted_matrices(arch, setup))
    if setup.method == "dora":
        n += sum(m.d_out for m, _ in adapted_matrices(arch, setup))
    if arch.task == "classification":
        n += sum(m.params for m in matrices(arch) if m.name in ("score", "classifier"))
    return n


@dataclass(frozen=True)
class Memory:
    """Peak training memory per GPU, in bytes, by component."""

    weights: float
    master_weights: float
    gradients: float
    optimizer_states: float
    activations: float
    transient: float
    overhead: float
    gpus: int = 1
    comm_buffers: float = 0.0  # DDP's gradient buckets (K > 1 GPUs)
    gathered: float = 0.0  # FSDP: unsharded parameters in flight (see gather_bytes)

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.master_weights
            + self.gradients
            + self.optimizer_states
            + self.activations
            + self.transient
            + self.overhead
            + self.comm_buffers
            + self.gathered
        )

    def replicated(self, gpus: int) -> Memory:
        """Per-GPU memory under DDP on ``gpus`` GPUs: everything of one GPU, plus the gradient buckets
        (a flat copy of the trainable gradients) once there is more than one process."""
        if gpus <= 0:
            raise PlanError(f"gpus={gpus!r} must be a positive integer")
        if self.gpus != 1:
            raise PlanError("replicated() starts from the single-GPU memory")
        if gpus == 1:
            return self
        return dataclasses.replace(self, gpus=gpus, comm_buffers=self.gradients)

    def sharded(self, gpus: int, gather_bytes: float) -> Memory:
        """Per-GPU memory when weights, gradients and optimizer states are split ``gpus`` ways (ZeRO-3 /
        FSDP, Rajbhandari et al. 2020), plus ``gather_bytes`` of gathered weights in flight."""
        if gpus <= 0:
            raise PlanError(f"gpus={gpus!r} must be a positive integer")
        if self.gpus != 1:
            raise PlanError("sharded() starts from the single-GPU memory")
        if gpus == 1:
            return self
        k = gpus
        return Memory(
            self.weights / k + gather_bytes,
            self.master_weights / k,
            self.gradients / k,
            self.optimizer_states / k,
            self.activations,
            self.transient,
            self.overhead,
            gpus,
            gathered=gather_bytes,
        )

    def as_gib(self) -> dict[str, float]:
        names = (
            "weights",
            "master_weights",
            "gradients",
            "optimizer_states",
            "activations",
            "transient",
            "overhead",
            "comm_buffers",
            "gathered",
        )
        out = {n: getattr(self, n) / GIB for n in names}
        out["total"] = self.total / GIB
        return out


def layer_activation_bytes(arch: Arch, setup: Setup, adapted: Sequence[tuple[Matrix, int]]) -> float:
    """Bytes autograd saves per token in one block (the block with adapters ``adapted``)."""
    a, p, s, full = arch, setup.act_bytes, setup.seq_len, setup.method == "full"
    h, i = a.hidden, a.intermediate
    group_adapted = [False] * 4  # by the input they read (Family.groups): q/k/v, attn output, MLP in, out
    extra = 0.0
    for m, r in adapted:
        g = a.layout.group_of(m.name)
        if g is None:
            raise PlanError(f"{m.name!r} is not a linear of a {a.family} block")
        group_adapted[g] = True
        extra += r * p  # A's output, kept for B's weight gradient
        if setup.lora_dropout > 0:
            extra += m.d_in * (p + 1)  # each adapter's own dropped input + its mask
        if setup.method == "dora":
            # the product m's gradient reads: base(x), or x_d W0^T under dropout (W0 itself is never saved:
            # lorakit re-materialises it in backward); measured in tests/adapters/test_dora_saved.py
            extra += m.d_out * p
    needs_input = [full or (g_ad and setup.lora_dropout == 0) for g_ad in group_adapted]
    # norms: HF's LlamaRMSNorm upcasts its input to fp32 (saved) and keeps the normalised x for the weight
    # gradient; fused LayerNorm keeps only its input
    norm = (4 * h + (p * h if full else 0)) if a.layout.rms_norm else p * h
    total = 2 * norm + extra
    total += p * (a.q_dim + 2 * a.kv_dim)  # Q (after RoPE), K, V: needed by the attention backward
    if setup.attention == "sdpa":
        total += p * a.q_dim + 4 * a.heads  # output (also the o-projection input) + log-sum-exp
    else:
        total += p * a.heads * s  # softmax probabilities, a*s per token (the 5as/h term's 2as/h)
        if a.attn_dropout > 0:
            total += (1 + p) * a.heads * s  # dropout mask + dropped probabilities
        total += p * a.q_dim if needs_input[1] else 0
    total += p * h if needs_input[0] else 0  # the shared q/k/v input
    total += p * h if needs_input[2] else 0  # the MLP input
    if a.gated:
        total += 3 * p * i  # gate output (SiLU input), SiLU output, up output: needed for the backward
        total += p * i if needs_input[3] else 0  # the product, input of down_proj
    else:
        total += p * i  # GELU input
        total += p * i if needs_input[3] else 0  # GELU output, input of the second linear
    if a.dropout > 0:
        total += 2 * h  # two residual dropout masks, 1 byte each
    return total


def activation_bytes(
    arch: Arch, setup: Setup, adapted: Sequence[tuple[Matrix, int]] | None = None
) -> tuple[float, float]:
    """(saved activations, transient backward buffers) in bytes for one micro-batch."""
    adapted = adapted_matrices(arch, setup) if adapted is None else adapted
    p, tokens, h = setup.act_bytes, setup.tokens_per_step, arch.hidden
    by_layer: dict[int, list[tuple[Matrix, int]]] = {n: [] for n in range(arch.layers)}
    for m, r in adapted:
        if m.layer is not None:
            by_layer[m.layer].append((m, r))
    per_layer = [layer_activation_bytes(arch, setup, by_layer[n]) for n in range(arch.layers)]
    if setup.grad_checkpointing:
        saved = arch.layers * p * h + max(per_layer)  # layer inputs + one block recomputed in the backward
    else:
        saved = sum(per_layer)
    full = setup.method == "full"
    head_trained = full or any(m.layer is None for m, _ in adapted) or arch.task == "classification"
    if not arch.layout.encoder:  # final norm (a post-norm encoder has none)
        saved += 4 * h + (p * h if full else 0) if arch.layout.rms_norm else p * h
    saved += p * h if head_trained else 0
    transient = (2 * arch.intermediate + h) * p * tokens  # gradient buffers of the block being back-propagated
    loss_saved, loss_transient = loss_activation_bytes(arch, setup, head_trained)
    return saved * tokens + loss_saved, max(transient, loss_transient)


def loss_activation_bytes(arch: Arch, setup: Setup, head_trained: bool = False) -> tuple[float, float]:
    """(saved, transient) bytes of a causal LM's loss for one micro-batch (``Setup.loss``; zero for other
    tasks, whose logits are one row per sequence). ``head_trained``: the output head has trainable
    parameters (full fine-tuning, an adapter on it), which takes lorakit's recomputed-chunks path."""
    if arch.task != "causal-lm":
        return 0.0, 0.0
    p, tokens, v = setup.act_bytes, setup.tokens_per_step, arch.vocab
    if setup.loss == "full":
        # logits (returned) + fp32 log-softmax kept by the loss; in backward the gradients of both
        return tokens * v * (p + 4), tokens * 2 * v * 4
    rows = min(tokens, chunk_rows(v))
    if not head_trained:
        # a frozen head: the rows' gradient (h per token) is taken in forward; a chunk's logits (then their
        # gradient, in place) and one row block's fp32 log-softmax are in flight, one chunk at a time
        return tokens * p * arch.hidden, rows * v * p + min(rows, block_rows(v)) * v * 4
    # the target rows gathered for the head (kept by every chunk) + the last chunk's fp32 log-softmax (not
    # recomputed); in backward one chunk's logits, log-softmax and their gradients
    return tokens * p * arch.hidden + rows * v * 4, rows * v * (p + 8)


def chunk_rows(vocab: int) -> int:
    """Rows per chunk of lorakit train's chunked cross-entropy (``lorakit.train.loss.TaskLoss``)."""
    return max(16, CHUNK_LOGITS // max(vocab, 1))


def block_rows(vocab: int) -> int:
    """Rows per block of a frozen head's in-forward gradient (``lorakit.train.loss.block_rows``)."""
    return max(1, BLOCK_LOGITS // max(vocab, 1))


def memory(arch: Arch, setup: Setup, gpu: Gpu | None = None, gpus: int = 1) -> Memory:
    """Peak memory per GPU for one training step (see the module docstring for every term)."""
    if gpus <= 0:
        raise PlanError(f"gpus={gpus!r} must be a positive integer")
    pc = count_params(arch)
    adapted = adapted_matrices(arch, setup)
    pw = setup.act_bytes  # compute dtype bytes
    opt_b = OPTIMIZERS[setup.optimizer]
    if setup.method == "full":
        n = pc.total
        weights, grads, opt = n * pw, n * pw, n * opt_b
        master = n * 4.0 if setup.precision == "bf16-mixed" else 0.0
    else:
        n = trainable_params(arch, setup)
        if setup.method == "qlora":
            frozen = pc.quantizable * NF4_BITS[setup.double_quant] / 8 + (pc.total - pc.quantizable) * pw
        else:
            frozen = pc.total * pw
        weights = frozen + n * setup.adapter_bytes
        grads, opt, master = n * setup.adapter_bytes, n * opt_b, 0.0
    acts, transient = activation_bytes(arch, setup, adapted)
    step_temp = 4.0 * n  # the optimizer step's fp32 temporaries (foreach AdamW), when activations are gone
    transient = max(transient, step_temp - acts)
    overhead = gpu.overhead_gb * GIB if gpu else 0.0
    mem1 = Memory(weights, master, grads, opt, acts, transient, overhead)
    return per_gpu(mem1, setup, gpus, gather_bytes(arch, setup))


def per_gpu(mem1: Memory, setup: Setup, gpus: int, gather: float = 0.0) -> Memory:
    """Memory per GPU on ``gpus`` GPUs under ``setup.distributed``, from the single-GPU memory ``mem1``;
    ``gather``: :func:`gather_bytes` (FSDP only). The one place a strategy turns into memory."""
    if setup.distributed == "ddp":
        return mem1.replicated(gpus)
    if setup.distributed == "fsdp":
        return mem1.sharded(gpus, gather)
    raise PlanError(f"distributed={setup.distributed!r} is not supported; expected one of {list(DISTRIBUTED)}")


def gather_bytes(arch: Arch, setup: Setup) -> float:
    """Parameters FSDP holds unsharded at the peak: the root's (everything outside the blocks: embeddings,
    final norm, head) and two blocks (computing + prefetched), in their storage dtype (NF4 for QLoRA's
    block linears, the compute dtype otherwise; full fine-tuning's bf16 weights)."""
    pc, pw = count_params(arch), setup.act_bytes
    block = sum(m.d_in * m.d_out for m in matrices(arch) if m.layer == 0)
    block_bytes = block * (NF4_BITS[setup.double_quant] / 8 if setup.method == "qlora" else pw)
    root = pc.embeddings + pc.head + 2 * arch.hidden  # + the final norm (at most weight and bias)
    return float(root * pw + 2 * block_bytes)


def gpus_needed(
    mem1: Memory, gpu: Gpu, setup: Setup, max_gpus: int = 64, gather: float = 0.0
) -> int | None:
    """The fewest GPUs (<= ``max_gpus``) on which the per-GPU memory under ``setup.distributed`` (with
    this GPU's framework overhead; FSDP's ``gather`` bytes in flight) fits, or None. Under DDP that is 1 or
    None: more GPUs add no memory."""
    cap = gpu.memory_gb * GIB
    mem1 = dataclasses.replace(mem1, overhead=gpu.overhead_gb * GIB)
    for k in range(1, max_gpus + 1):
        if per_gpu(mem1, setup, k, gather).total <= cap:
            return k
        if k == 1 and setup.distributed == "ddp":  # per-GPU memory only grows with k
            return None
    return None


def flops_per_token(arch: Arch, setup: Setup) -> float:
    """Training FLOPs per token (forward + backward [+ recompute]), see the module docstring."""
    mats = matrices(arch)
    n_mm = sum(m.d_in * m.d_out for m in mats if m.layer is not None or arch.task == "causal-lm")
    causal_skip = 0.5 if (arch.causal and setup.attention == "sdpa") else 1.0
    attn = 4 * arch.layers * setup.seq_len * arch.q_dim * causal_skip
    n_ad = sum(r * (m.d_in + m.d_out) for m, r in adapted_matrices(arch, setup))
    fwd = 2 * n_mm + attn + 2 * n_ad
    if setup.method == "full":
        train = 3 * fwd
    else:
        train = 4 * n_mm + 3 * attn + 6 * n_ad
    if setup.grad_checkpointing:
        train += fwd
    return float(train)


def flops_per_step_extra(arch: Arch, setup: Setup) -> float:
    """Per-micro-batch FLOPs that do not scale with tokens: DoRA's dense B@A and column norms."""
    if setup.method != "dora":
        return 0.0
    per_fwd = sum(2 * r * m.d_in * m.d_out + 3 * m.d_in * m.d_out for m, r in adapted_matrices(arch, setup))
    return float(per_fwd * (2 if setup.grad_checkpointing else 1))


def train_hours(total_flops: float, gpu: Gpu, gpus: int, mfu: float) -> float:
    """Wall-clock hours = FLOPs / (GPUs x peak x MFU)."""
    if not 0 < mfu <= 1:
        raise PlanError(f"mfu={mfu!r} must be in (0, 1]")
    return total_flops / (gpus * gpu.peak_tflops * 1e12 * mfu) / 3600.0
