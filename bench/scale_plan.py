"""Scale plan for a WRPO fusion run: GPU-hours, wall time on N GPUs and bytes per stage, from named rates.

What it is for: before renting GPUs, project what the paper's setting costs (configs/paper.yaml: ten
source LLMs, ~60k UltraFeedback prompts, n=5 samples, Llama-3-8B target, ArmoRM reward model) and how
that grows at 2x and 10x the prompts, or with more sources or samples. Nothing is measured here: every
number follows from the rates printed first, each with its published source, "measured", or a labelled
assumption and the flag that overrides it. A user with a GPU measurement plugs it in (flags or
`--rates FILE.json`, whose keys are the flag names with underscores).

Run:
    .venv/bin/python bench/scale_plan.py [--config configs/paper.yaml] [--gpus 8,32,64] [--scales 1,2,10]
        [--train-mfu 0.45] [--decode-rate google/gemma-2-9b-it=3000] [--params my/model=7/7]
        [--rates my_rates.json] [--json plan.json]

The model (see the docstrings below): decode GPU-seconds = generated tokens / the per-GPU vLLM decode
rate of the model's size (log-log interpolation between two published anchors); reward scoring and
the reference pass = 2*N*tokens / (forward MFU x peak); SFT and WRPO = 6*N*tokens / (train MFU x peak).
Wall time on N GPUs: stages run one after the other; sampling and scoring spread over all N GPUs in
replicas of the model's tensor-parallel size (a source with TP 8 needs >= 8 GPUs); training uses at most
global batch / per-device batch GPUs (more would change the batch) and loses `internode_efficiency`
past one node; the reference pass runs on `reference_gpus` (this repo: one process, see
wrpo_core/train/worker.py). Not counted: model loading, queueing, CPU stages, attention FLOPs beyond
6N/2N, padding in unpacked batches, and longer outputs' lower decode batch (the anchors use
max-seq-len 2048, this config decodes up to 4096 tokens). The rates are for H100/H200-class GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LAMBDA = "https://github.com/LambdaLabsML/vllm-benchmark/blob/main/benchmark_v0.md"
ASSUMED = "ASSUMPTION (no published figure found)"
ID_BYTES = 64  # prompt_id: sha256 hex (wrpo_core/schemas.py)
SAMPLE_FIXED_BYTES = 4 + 4 + 4 + 4 + 8  # sample_index, finish_reason "stop", prompt/completion_tokens, seed
NAME_BYTES = 32  # a model-name column (y_ws_model) in BEST_SOURCE / QUADRUPLES


@dataclass
class Rates:
    """Every per-token rate and constant the plan uses; field names are the flags (with dashes)."""

    decode_small_tok_s: float = 8088.35
    decode_small_params_b: float = 8.03
    decode_large_tok_s: float = 3542.88 / 4
    decode_large_params_b: float = 70.6
    moe_effective: str = "geomean"
    peak_tflops: float = 989.0
    train_mfu: float = 0.38
    forward_mfu: float = 0.38
    internode_efficiency: float = 0.57
    reference_gpus: int = 1
    chars_per_token: float = 4.0
    parquet_ratio: float = 1.0
    checkpoint_bytes_per_param: float = 16.0
    model_bytes_per_param: float = 2.0
    decode_rate: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)


RATE_SOURCES = {
    "decode_small_tok_s": f"{LAMBDA} 'vLLM v0.5.4 v.s. v0.6.0': Llama 3.1 8B (BF16 Instruct, cache_model.py), "
    "1xH100 SXM, v0.6.0 + 10 scheduler steps, max-seq-len 2048: 8088.35 output tok/s",
    "decode_small_params_b": "https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct : 8.03B parameters",
    "decode_large_tok_s": f"{LAMBDA} same table: Llama 3.1 70B, TP4 on 4xH100, 3542.88 output tok/s / 4 GPUs",
    "decode_large_params_b": "https://huggingface.co/meta-llama/Llama-3.1-70B-Instruct : 70.6B parameters",
    "moe_effective": "ASSUMPTION: an MoE decodes like a dense model of sqrt(active*total) params. Cross-check: "
    "https://github.com/NVIDIA/TensorRT-LLM/blob/main/docs/source/performance/perf-overview.md "
    "(H200 FP8, ISL/OSL 500/2000): Qwen3-235B-A22B TP8 28,026 tok/s = 3,503/GPU vs Llama-3.3-70B TP1 3,666/GPU",
    "peak_tflops": "https://www.nvidia.com/en-us/data-center/h100/ : BF16 Tensor Core 1,979 TFLOPS with "
    "sparsity, 989 dense (H200 page: same 1,979); bench/gpu_check.py uses 989",
    "train_mfu": "https://arxiv.org/abs/2407.21783 Table 4 (Llama 3, BF16 on H100): MFU 38-43%; lowest taken. "
    "Higher published: 53.8% for an 8B Llama-3 with FSDP=4 on H200, full act. ckpt, torch.compile "
    "(https://github.com/KempnerInstitute/KempnerForge/blob/main/benchmarks/mfu_scaling/mfu_scaling_2026-04-05.md)",
    "forward_mfu": f"{ASSUMED}: batched HF forward (ArmoRM scoring, reference pass) at the training MFU",
    "internode_efficiency": "https://github.com/KempnerInstitute/KempnerForge/blob/main/benchmarks/mfu_scaling/mfu_scaling_2026-04-05.md : 7B FSDP 93% linear at 4 GPUs in one node, "
    "53% at 8 GPUs over 2 nodes: 0.53/0.93 = 0.57 per-GPU throughput once training spans nodes",
    "reference_gpus": "this repo: launch_local runs the reference pass in one process (wrpo_core/train/worker.py)",
    "chars_per_token": "https://help.openai.com/en/articles/4936856-what-are-tokens-and-how-to-count-them : "
    "1 token ~ 4 characters of English (OpenAI tokenizers; Llama 3's is similar, not checked)",
    "parquet_ratio": "ASSUMPTION: 1.0 = no compression (bytes are upper bounds); Parquet snappy shrinks text",
    "checkpoint_bytes_per_param": "https://arxiv.org/abs/1910.02054 Sec. 3.1 (ZeRO): mixed-precision Adam keeps "
    "2 (bf16 params) + 12 (fp32 params, m, v) bytes/param; + 2 for the gathered 16-bit model = 16",
    "model_bytes_per_param": "bf16 weights: 2 bytes per parameter (the final model, saved in bf16)",
}

MEASURED_NOT_USED = (
    "measured (bench/RESULTS.md, 2026-11-26, one H200, fp32 toy Llama 1.07B, WRPO stored reference): 2695 "
    "train tok/s; a toy-sized fp32 model, NOT extrapolated to the 8B target (different size, precision, kernels)"
)

# (total params B, active params B, where the size comes from) for the paper's models.
KNOWN_PARAMS: dict[str, tuple[float, float, str]] = {
    "mistralai/Mistral-Large-Instruct-2407": (123, 123, "model card: dense LLM of 123B parameters"),
    "google/gemma-2-27b-it": (27, 27, "model name / card (27B)"),
    "Qwen/Qwen2-72B-Instruct": (72, 72, "model name / card (72B)"),
    "meta-llama/Meta-Llama-3-70B-Instruct": (
        70.6,
        70.6,
        "model card (70B; 70.6e9 as in tests/test_discovery.py)",
    ),
    "google/gemma-2-9b-it": (9, 9, "model name / card (9B)"),
    "internlm/internlm2_5-20b-chat": (20, 20, "model name / card (20B)"),
    "deepseek-ai/DeepSeek-V2-Chat-0628": (
        236,
        21,
        "github.com/deepseek-ai/DeepSeek-V2: 236B total, 21B active",
    ),
    "deepseek-ai/DeepSeek-Coder-V2-Instruct-0724": (
        236,
        21,
        "DeepSeek-Coder-V2 model card: 236B total, 21B active",
    ),
    "01-ai/Yi-1.5-34B-Chat": (34, 34, "model name / card (34B)"),
    "microsoft/Phi-3-medium-4k-instruct": (14, 14, "model card: 14B parameters"),
    "meta-llama/Meta-Llama-3-8B-Instruct": (8.03, 8.03, "model card (8B; 8.03e9)"),
    "RLHFlow/ArmoRM-Llama3-8B-v0.1": (8.03, 8.03, "Llama-3-8B backbone (model card)"),
}


@dataclass(frozen=True)
class Lengths:
    """Mean token lengths (assumptions, flags) and the prompt count; the paper's datasets give none."""

    prompts: int = 59876
    prompt_tokens: float = 200.0
    response_tokens: float = 500.0
    target_response_tokens: float = 500.0


LENGTH_SOURCES = {
    "prompts": "https://huggingface.co/datasets/princeton-nlp/llama3-ultrafeedback-armorm : train split 59.9k "
    "rows (59,876 in dataset_info of copies of it); /work/shared/WRPO.md: ~60k",
    "prompt_tokens": f"{ASSUMED}: mean prompt length in tokens",
    "response_tokens": f"{ASSUMED}: mean source response length in tokens (capped by max_new_tokens)",
    "target_response_tokens": f"{ASSUMED}: mean Target-SFT response length in tokens",
}


@dataclass(frozen=True)
class Model:
    """A model as the plan sees it: size, tensor-parallel size, and its sampling n / max_new_tokens."""

    name: str
    total_b: float
    active_b: float
    tp: int = 1
    n: int = 5
    max_new_tokens: int = 4096
    size_source: str = ""


@dataclass(frozen=True)
class Training:
    """One training job's shape: epochs, sequence limits, batch, checkpointing."""

    epochs: float
    max_length: int
    max_prompt_length: int
    global_batch: int
    per_device_batch: int
    packing: bool = False
    save_steps: int = 500
    save_total_limit: int | None = 2


@dataclass(frozen=True)
class Setup:
    """Everything a plan is computed from, taken from a config (or built by hand in the tests)."""

    sources: tuple[Model, ...]
    target: Model
    reward: Model
    reward_max_length: int
    sft_fraction: float
    sft: Training
    wrpo: Training
    gpus_per_node: int = 8


@dataclass
class Stage:
    """One stage's cost: tokens it processes, GPU-seconds at the rated throughput, bytes it writes."""

    name: str
    group: str
    tokens: float
    gpu_s: float
    bytes: float
    replica: int = 1
    max_gpus: int | None = None
    training: bool = False
    rate: str = ""


def decode_rate(model: Model, rates: Rates) -> float:
    """Output tokens/s per GPU for vLLM decode: an override, else the anchors interpolated in log-log."""
    if model.name in rates.decode_rate:
        return rates.decode_rate[model.name]
    size = {"geomean": math.sqrt(model.active_b * model.total_b), "active": model.active_b}.get(
        rates.moe_effective, model.total_b
    )
    slope = math.log(rates.decode_large_tok_s / rates.decode_small_tok_s) / math.log(
        rates.decode_large_params_b / rates.decode_small_params_b
    )
    return rates.decode_small_tok_s * (size / rates.decode_small_params_b) ** slope


def flops_seconds(
    flops_per_token_param: float, params_b: float, tokens: float, mfu: float, rates: Rates
) -> float:
    """GPU-seconds for `tokens` at `flops_per_token_param` * N FLOPs per token (2 forward, 6 training)."""
    return flops_per_token_param * params_b * 1e9 * tokens / (mfu * rates.peak_tflops * 1e12)


def text_bytes(tokens: float, rates: Rates) -> float:
    """Bytes of text for `tokens` tokens (UTF-8, ~1 byte per character of English)."""
    return tokens * rates.chars_per_token


def sequence_tokens(prompt: float, response: float, max_length: int, max_prompt: int) -> float:
    """Tokens of one prompt+response sequence after the trainer's truncation (prompt first, from the left)."""
    kept_prompt = min(prompt, max_prompt)
    return kept_prompt + min(response, max_length - kept_prompt)


def checkpoint_bytes(job: Training, steps: int, params_b: float, rates: Rates) -> float:
    """The final bf16 model plus the resume checkpoints still kept (save_total_limit) at the end."""
    saves = steps // job.save_steps if job.save_steps > 0 else 0
    kept = saves if job.save_total_limit is None else min(saves, job.save_total_limit)
    return params_b * 1e9 * (rates.model_bytes_per_param + kept * rates.checkpoint_bytes_per_param)


def plan_stages(setup: Setup, lengths: Lengths, rates: Rates) -> list[Stage]:
    """Every stage's tokens, GPU-seconds and bytes for one workload (see the module docstring)."""
    p, lp = lengths.prompts, lengths.prompt_tokens
    ratio = rates.parquet_ratio
    id_bytes = ID_BYTES
    stages = [Stage("ingest prompts", "cpu", 0, 0, p * (id_bytes + text_bytes(lp, rates)) / ratio)]
    rm = setup.reward
    for src in setup.sources:
        lr = min(lengths.response_tokens, src.max_new_tokens)
        rows = p * src.n
        tokens = rows * lr
        stages.append(
            Stage(
                f"sample {src.name}",
                "sample sources",
                tokens,
                tokens / decode_rate(src, rates),
                rows * (id_bytes + len(src.name) + SAMPLE_FIXED_BYTES + text_bytes(lr, rates)) / ratio,
                replica=src.tp,
                rate=f"decode {decode_rate(src, rates):,.0f} tok/s/GPU",
            )
        )
        scored = rows * min(lp + lr, setup.reward_max_length)
        stages.append(
            Stage(
                f"score {src.name}",
                "score sources",
                scored,
                flops_seconds(2, rm.active_b, scored, rates.forward_mfu, rates),
                rows * (id_bytes + len(src.name) + 4 + len(rm.name) + 8) / ratio,
                replica=rm.tp,
                rate="2N fwd",
            )
        )
    lr_src = min(lengths.response_tokens, min((s.max_new_tokens for s in setup.sources), default=0))
    sft_rows = round(p * setup.sft_fraction)
    pref_rows = p - sft_rows
    stages.append(
        Stage(
            "select y_ws",
            "cpu",
            0,
            0,
            p * (id_bytes + NAME_BYTES + text_bytes(lp + lr_src, rates) + 12) / ratio,
        )
    )
    sft = setup.sft
    sft_seq = sequence_tokens(lp, lr_src, sft.max_length, sft.max_prompt_length)
    sft_tokens = sft_rows * sft_seq * sft.epochs
    per_epoch = sft_rows * sft_seq / sft.max_length if sft.packing else sft_rows
    sft_steps = math.ceil(math.ceil(per_epoch) / sft.global_batch * sft.epochs)
    t = setup.target
    stages.append(
        Stage(
            "SFT (Target-SFT)",
            "sft",
            sft_tokens,
            flops_seconds(6, t.total_b, sft_tokens, rates.train_mfu, rates),
            checkpoint_bytes(sft, sft_steps, t.total_b, rates),
            max_gpus=sft.global_batch // sft.per_device_batch,
            training=True,
            rate=f"6N train, {sft_steps} steps",
        )
    )
    lt = min(lengths.target_response_tokens, t.max_new_tokens)
    t_rows = pref_rows * t.n
    stages.append(
        Stage(
            "sample Target-SFT",
            "sample target",
            t_rows * lt,
            t_rows * lt / decode_rate(t, rates),
            t_rows * (id_bytes + len(t.name) + SAMPLE_FIXED_BYTES + text_bytes(lt, rates)) / ratio,
            replica=t.tp,
            rate=f"decode {decode_rate(t, rates):,.0f} tok/s/GPU",
        )
    )
    t_scored = t_rows * min(lp + lt, setup.reward_max_length)
    stages.append(
        Stage(
            "score Target-SFT",
            "score target",
            t_scored,
            flops_seconds(2, rm.active_b, t_scored, rates.forward_mfu, rates),
            t_rows * (id_bytes + len(t.name) + 4 + len(rm.name) + 8) / ratio,
            replica=rm.tp,
            rate="2N fwd",
        )
    )
    quad_bytes = pref_rows * (id_bytes + text_bytes(lp + lr_src + 2 * lt, rates) + NAME_BYTES + 6 * 8) / ratio
    stages.append(Stage("select quadruples", "cpu", 0, 0, quad_bytes))
    w = setup.wrpo
    row_tokens = sequence_tokens(lp, lr_src, w.max_length, w.max_prompt_length) + 2 * sequence_tokens(
        lp, lt, w.max_length, w.max_prompt_length
    )
    if w.packing:  # wrpo.pack_prompt: one row per example, the prompt encoded once for its three responses
        row_tokens -= 2 * min(lp, w.max_prompt_length)
    ref_tokens = pref_rows * row_tokens
    stages.append(
        Stage(
            "reference log-probs",
            "reference",
            ref_tokens,
            flops_seconds(2, t.total_b, ref_tokens, rates.forward_mfu, rates),
            quad_bytes + pref_rows * 24 / ratio,
            max_gpus=rates.reference_gpus,
            rate="2N fwd, " + ("prompt once per row (packed)" if w.packing else "3 sequences/row"),
        )
    )
    wrpo_tokens = ref_tokens * w.epochs
    wrpo_steps = math.ceil(pref_rows / w.global_batch * w.epochs)
    stages.append(
        Stage(
            "WRPO",
            "wrpo",
            wrpo_tokens,
            flops_seconds(6, t.total_b, wrpo_tokens, rates.train_mfu, rates),
            checkpoint_bytes(w, wrpo_steps, t.total_b, rates),
            max_gpus=w.global_batch // w.per_device_batch,
            training=True,
            rate=f"6N train, {wrpo_steps} steps",
        )
    )
    return stages


GROUP_ORDER = (
    "cpu",
    "sample sources",
    "score sources",
    "sft",
    "sample target",
    "score target",
    "reference",
    "wrpo",
)


def training_gpus(gpus: int, max_gpus: int) -> int:
    """Processes a training job can use on `gpus` GPUs: the most that divide global / per-device batch.

    The repo keeps the global batch on any world size, so global_batch_size must be a multiple of
    per_device_train_batch_size x processes (wrpo_core/config/training.py: gradient_accumulation).
    """
    return max(w for w in range(1, min(gpus, max_gpus) + 1) if max_gpus % w == 0)


def group_wall_s(stages: list[Stage], gpus: int, setup: Setup, rates: Rates) -> float | None:
    """Wall seconds of one group of stages on `gpus` GPUs; None when a replica needs more GPUs than that."""
    if not stages or all(s.gpu_s == 0 for s in stages):
        return 0.0
    if any(s.replica > gpus for s in stages):
        return None
    if stages[0].max_gpus is not None:  # one job: training or the reference pass
        work = sum(s.gpu_s for s in stages)
        if not stages[0].training:
            return work / min(gpus, stages[0].max_gpus)
        used = training_gpus(gpus, stages[0].max_gpus)
        if used <= setup.gpus_per_node:
            return work / used
        # past one node each GPU slows down; a job that would be slower that way stays on one node
        one_node = training_gpus(min(gpus, setup.gpus_per_node), stages[0].max_gpus)
        return min(work / (used * rates.internode_efficiency), work / one_node)
    packed = sum(s.gpu_s for s in stages) / gpus  # divisible shards packed onto all GPUs
    longest = max(s.gpu_s / (gpus // s.replica * s.replica) for s in stages)  # one model's replicas only
    return max(packed, longest)


def wall_time(stages: list[Stage], gpus: int, setup: Setup, rates: Rates) -> dict:
    """Wall hours per group and in total on `gpus` GPUs, and GPU-hours held if all stay allocated."""
    groups = {}
    for group in GROUP_ORDER:
        seconds = group_wall_s([s for s in stages if s.group == group], gpus, setup, rates)
        groups[group] = None if seconds is None else seconds / 3600
    if any(v is None for v in groups.values()):
        need = max(s.replica for s in stages)
        return {
            "gpus": gpus,
            "groups": groups,
            "total_h": None,
            "held_gpu_h": None,
            "note": f"needs >= {need} GPUs",
        }
    total = sum(groups.values())
    return {"gpus": gpus, "groups": groups, "total_h": total, "held_gpu_h": total * gpus, "note": ""}


def summarize(setup: Setup, lengths: Lengths, rates: Rates, gpus: list[int]) -> dict:
    """One workload's stages, totals and wall times on each GPU count (plain data for tables and JSON)."""
    stages = plan_stages(setup, lengths, rates)
    return {
        "prompts": lengths.prompts,
        "sources": len(setup.sources),
        "stages": [dataclasses.asdict(s) | {"gpu_h": s.gpu_s / 3600} for s in stages],
        "total_gpu_h": sum(s.gpu_s for s in stages) / 3600,
        "total_bytes": sum(s.bytes for s in stages),
        "wall": [wall_time(stages, n, setup, rates) for n in gpus],
    }


def with_sources(setup: Setup, count: int) -> Setup:
    """The setup with `count` sources: the config's list cut, or repeated in order past its length."""
    listed = setup.sources
    return dataclasses.replace(setup, sources=tuple(listed[i % len(listed)] for i in range(count)))


def with_n(setup: Setup, n: int) -> Setup:
    """The setup with every source and the target sampling `n` responses per prompt."""
    sources = tuple(dataclasses.replace(s, n=n) for s in setup.sources)
    return dataclasses.replace(setup, sources=sources, target=dataclasses.replace(setup.target, n=n))


def model_size(name: str, rates: Rates) -> tuple[float, float, str]:
    """(total B, active B, where from): `--params`, the known table, else a size in the name ('...-8B-...')."""
    if name in rates.params:
        total, _, active = rates.params[name].partition("/")
        return float(total), float(active or total), "--params"
    if name in KNOWN_PARAMS:
        return KNOWN_PARAMS[name]
    found = re.search(r"(\d+(?:\.\d+)?)[bB](?![a-zA-Z])", name.rsplit("/", 1)[-1])
    if found:
        return float(found.group(1)), float(found.group(1)), "from the model's name"
    raise SystemExit(f"{name}: parameter count unknown; pass --params '{name}=TOTAL_B[/ACTIVE_B]'")


def setup_from_config(path: str, rates: Rates, n: int | None = None) -> Setup:
    """A Setup from a FusionConfig YAML (loaded offline: pydantic only, no model is opened)."""
    from wrpo_core.config import FusionConfig, load_config

    cfg = load_config(path, FusionConfig)

    def model(spec, tp: int = 1) -> Model:
        total, active, where = model_size(spec.path, rates)
        sampling = getattr(spec, "sampling", None)
        return Model(
            spec.path,
            total,
            active,
            tp,
            n or (sampling.n if sampling else 1),
            sampling.max_new_tokens if sampling else 0,
            where,
        )

    def job(hp, max_length: int, max_prompt: int, packing: bool) -> Training:
        world = cfg.launch.nproc_per_node * cfg.launch.nnodes
        batch = (
            hp.global_batch_size or hp.per_device_train_batch_size * hp.gradient_accumulation_steps * world
        )
        return Training(
            hp.num_train_epochs,
            max_length,
            max_prompt,
            batch,
            hp.per_device_train_batch_size,
            packing,
            hp.save_steps,
            hp.save_total_limit,
        )

    return Setup(
        sources=tuple(model(s, s.tensor_parallel_size) for s in cfg.sources),
        target=model(cfg.target, cfg.target.tensor_parallel_size),
        reward=model(cfg.reward_model),
        reward_max_length=cfg.reward_model.max_length,
        sft_fraction=cfg.split.sft_fraction,
        sft=job(cfg.sft, cfg.sft.max_seq_length, cfg.sft.max_prompt_length, cfg.sft.packing),
        wrpo=job(cfg.wrpo, cfg.wrpo.max_length, cfg.wrpo.max_prompt_length, cfg.wrpo.pack_prompt),
        gpus_per_node=cfg.launch.nproc_per_node,
    )


def human_bytes(value: float) -> str:
    """1.2 GB style (decimal units)."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if value < 1000 or unit == "PB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{value:.0f} B"
        value /= 1000
    return ""


def hours(value: float | None) -> str:
    """Hours with one decimal, or n/a (the setting cannot run on that many GPUs)."""
    return "n/a" if value is None else f"{value:,.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def rates_rows(rates: Rates, lengths: Lengths) -> list[list[str]]:
    """The rates table: every number the plan uses, its value and its source."""
    rows = [[name, str(getattr(rates, name)), RATE_SOURCES[name]] for name in RATE_SOURCES]
    rows += [[name, str(getattr(lengths, name)), LENGTH_SOURCES[name]] for name in LENGTH_SOURCES]
    rows += [[f"decode_rate[{k}]", str(v), "--decode-rate (user)"] for k, v in rates.decode_rate.items()]
    rows.append(["(not used) H200 toy", "2695 tok/s", MEASURED_NOT_USED])
    return rows


def setting_markdown(title: str, result: dict, gpus: list[int]) -> str:
    """One workload's stage table and wall-time table."""
    rows = [
        [s["name"], f"{s['tokens'] / 1e9:,.3f}", f"{s['gpu_h']:,.1f}", human_bytes(s["bytes"]), s["rate"]]
        for s in result["stages"]
    ]
    rows.append(
        [
            "**total**",
            "",
            f"**{result['total_gpu_h']:,.1f}**",
            f"**{human_bytes(result['total_bytes'])}**",
            "",
        ]
    )
    stage_table = table(["stage", "tokens (B)", "GPU-h", "bytes", "rate / notes"], rows)
    walls = result["wall"]
    wall_rows = [[g] + [hours(w["groups"][g]) for w in walls] for g in GROUP_ORDER if g != "cpu"]
    wall_rows.append(
        ["**total wall h**"] + [hours(w["total_h"]) + (f" ({w['note']})" if w["note"] else "") for w in walls]
    )
    wall_rows.append(["GPU-h held (wall x N)"] + [hours(w["held_gpu_h"]) for w in walls])
    wall_table = table(["stage group, wall hours"] + [f"N={n}" for n in gpus], wall_rows)
    return f"## {title}\n\n{stage_table}\n\n{wall_table}\n"


def growth_rows(setup: Setup, lengths: Lengths, rates: Rates, gpus: list[int]) -> list[dict]:
    """Cost as one of sources / prompts / n / response length varies with the others at the 1x setting."""
    base = len(setup.sources)
    n0 = setup.sources[0].n if setup.sources else setup.target.n
    cases = [("sources", k, with_sources(setup, k), lengths) for k in (1, max(base // 2, 1), base, 2 * base)]
    cases += [
        ("prompts", f"x{f:g}", setup, dataclasses.replace(lengths, prompts=round(lengths.prompts * f)))
        for f in (0.5, 1, 2, 10)
    ]
    cases += [("n", k, with_n(setup, k), lengths) for k in (2, n0, 2 * n0)]
    cases += [
        (
            "response tokens",
            r,
            setup,
            dataclasses.replace(lengths, response_tokens=r, target_response_tokens=r),
        )
        for r in (lengths.response_tokens / 2, lengths.response_tokens, lengths.response_tokens * 2)
    ]
    out = []
    for dim, value, s, ln in cases:
        result = summarize(s, ln, rates, gpus)
        by_group = {g: sum(x["gpu_h"] for x in result["stages"] if x["group"] == g) for g in GROUP_ORDER}
        out.append(
            {
                "vary": dim,
                "value": value,
                "total_gpu_h": result["total_gpu_h"],
                "groups_gpu_h": by_group,
                "total_bytes": result["total_bytes"],
                "wall_h": {w["gpus"]: w["total_h"] for w in result["wall"]},
            }
        )
    return out


def growth_markdown(rows: list[dict], gpus: list[int]) -> str:
    """The growth table; "vs 1x" divides by the 1x setting's total GPU-hours."""
    base = next(r["total_gpu_h"] for r in rows if r["vary"] == "prompts" and r["value"] == "x1")
    body = [
        [
            r["vary"],
            str(r["value"]),
            f"{r['total_gpu_h']:,.0f}",
            f"{r['total_gpu_h'] / base:.2f}x",
            f"{r['groups_gpu_h']['sample sources'] + r['groups_gpu_h']['score sources']:,.0f}",
            f"{r['groups_gpu_h']['sft']:,.1f}",
            f"{r['groups_gpu_h']['wrpo'] + r['groups_gpu_h']['reference']:,.1f}",
            human_bytes(r["total_bytes"]),
        ]
        + [hours(r["wall_h"][n]) for n in gpus]
        for r in rows
    ]
    header = [
        "vary",
        "value",
        "GPU-h",
        "vs 1x",
        "sources sample+score GPU-h",
        "SFT GPU-h",
        "ref+WRPO GPU-h",
        "bytes",
    ]
    return "## How cost grows (one dimension at a time, others at 1x)\n\n" + table(
        header + [f"wall h N={n}" for n in gpus], body
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags: the config, GPU counts, scales, and one flag per rate / length (defaults in the rates table)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "paper.yaml"))
    parser.add_argument("--gpus", default="8,32,64", help="GPU counts for wall time")
    parser.add_argument("--scales", default="1,2,10", help="multiples of the prompt count")
    parser.add_argument("--n", type=int, default=None, help="samples per prompt (default: the config's)")
    parser.add_argument("--rates", help="JSON file: {field: value} for any rate or length below")
    parser.add_argument("--json", help="write the same data as JSON here")
    for name, value in dataclasses.asdict(Rates()).items():
        if not isinstance(value, dict):
            parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=None)
    parser.add_argument("--decode-rate", action="append", default=[], metavar="MODEL=TOK_S")
    parser.add_argument("--params", action="append", default=[], metavar="MODEL=TOTAL_B[/ACTIVE_B]")
    for name, value in dataclasses.asdict(Lengths()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=None)
    return parser.parse_args(argv)


def rates_and_lengths(args: argparse.Namespace) -> tuple[Rates, Lengths]:
    """Defaults, then the --rates JSON file, then flags (last wins)."""
    values: dict = dataclasses.asdict(Rates()) | dataclasses.asdict(Lengths())
    if args.rates:
        loaded = json.loads(Path(args.rates).read_text(encoding="utf-8"))
        unknown = set(loaded) - set(values)
        if unknown:
            raise SystemExit(f"{args.rates}: unknown keys {sorted(unknown)}; known: {sorted(values)}")
        values |= loaded
    for name in values:
        flag = getattr(args, name, None)
        if flag is not None and not isinstance(values[name], dict):
            values[name] = flag
    for item in args.decode_rate:
        model, _, rate = item.rpartition("=")
        values["decode_rate"] = {**values["decode_rate"], model: float(rate)}
    for item in args.params:
        model, _, size = item.rpartition("=")
        values["params"] = {**values["params"], model: size}
    rate_keys = {f.name for f in dataclasses.fields(Rates)}
    rates = Rates(**{k: v for k, v in values.items() if k in rate_keys})
    return rates, Lengths(**{k: v for k, v in values.items() if k not in rate_keys})


def main(argv: list[str] | None = None) -> dict:
    """Prints the plan as markdown; returns (and with --json writes) the same data."""
    args = parse_args(argv)
    rates, lengths = rates_and_lengths(args)
    gpus = [int(x) for x in args.gpus.split(",")]
    setup = setup_from_config(args.config, rates, args.n)
    models = [
        {
            "model": m.name,
            "role": role,
            "total_b": m.total_b,
            "active_b": m.active_b,
            "tp": m.tp,
            "n": m.n,
            "decode_tok_s_per_gpu": decode_rate(m, rates) if role != "reward" else None,
            "size_source": m.size_source,
        }
        for role, group in (
            ("source", setup.sources),
            ("target", (setup.target,)),
            ("reward", (setup.reward,)),
        )
        for m in group
    ]
    settings = []
    for scale in [float(x) for x in args.scales.split(",")]:
        scaled = dataclasses.replace(lengths, prompts=round(lengths.prompts * scale))
        settings.append({"scale": scale} | summarize(setup, scaled, rates, gpus))
    growth = growth_rows(setup, lengths, rates, gpus)
    shown = Path(args.config).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    out = [
        f"# WRPO scale plan ({shown})\n",
        "## Rates and assumptions (every number below comes from these)\n",
        table(["rate", "value", "source"], rates_rows(rates, lengths)),
        "",
        "## Models\n",
        table(
            ["model", "role", "params B (total/active)", "TP", "n", "decode tok/s/GPU", "size from"],
            [
                [
                    m["model"],
                    m["role"],
                    f"{m['total_b']:g}/{m['active_b']:g}",
                    str(m["tp"]),
                    str(m["n"]),
                    "" if m["decode_tok_s_per_gpu"] is None else f"{m['decode_tok_s_per_gpu']:,.0f}",
                    m["size_source"],
                ]
                for m in models
            ],
        ),
        "",
    ]
    for s in settings:
        title = f"Setting {s['scale']:g}x: {s['prompts']:,} prompts, {s['sources']} sources"
        out.append(setting_markdown(title, s, gpus))
    out.append(growth_markdown(growth, gpus))
    print("\n".join(out))
    data = {
        "config": args.config,
        "rates": dataclasses.asdict(rates),
        "lengths": dataclasses.asdict(lengths),
        "sources_of_rates": RATE_SOURCES | LENGTH_SOURCES,
        "models": models,
        "settings": settings,
        "growth": growth,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    return data


if __name__ == "__main__":
    main()
