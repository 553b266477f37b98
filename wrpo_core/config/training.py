"""Training settings: SFT and WRPO hyper-parameters, how a job is launched, and the job configs.

Defaults are the paper's (arXiv 2412.03187) and the authors' released training configs.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from wrpo_core.config.base import ConfigModel, FieldProblem, checked_name, checked_root_url


class _TrainingHyperparameters(ConfigModel):
    learning_rate: Annotated[
        float,
        Field(gt=0, description="Peak learning rate, reached after warmup, then decayed by the schedule."),
    ]
    num_train_epochs: Annotated[
        float,
        Field(
            gt=0, description="Passes over the training data (fractions allowed). Paper: 1 for SFT and WRPO."
        ),
    ] = 1.0
    max_steps: int = Field(default=-1, description="Overrides epochs when > 0.")
    per_device_train_batch_size: Annotated[
        int,
        Field(
            ge=1,
            description="Examples per GPU per forward/backward pass; the global batch is this x "
            "gradient_accumulation_steps x GPUs.",
        ),
    ]
    gradient_accumulation_steps: Annotated[
        int,
        Field(
            ge=1,
            description="Micro-batches whose gradients are summed into one optimizer step. Not used when "
            "global_batch_size is set (then derived from it).",
        ),
    ]
    global_batch_size: Annotated[
        int | None,
        Field(
            ge=1,
            description="Examples per optimizer step over all processes. When set, gradient accumulation is "
            "global_batch_size / (per_device_train_batch_size x processes), which must divide exactly, so the "
            "same config keeps its batch on any number of GPUs; None = use gradient_accumulation_steps as "
            "given (the global batch then grows with the GPUs). Paper: 128.",
        ),
    ] = None
    lr_scheduler_type: str = Field(
        default="cosine",
        description="Transformers learning-rate schedule after warmup ('cosine', 'linear', 'constant', ...). "
        "Paper: cosine.",
    )
    warmup_ratio: Annotated[
        float,
        Field(
            ge=0,
            lt=1,
            description="Fraction of the optimizer steps over which the learning rate rises linearly from 0. "
            "Paper: 0.1.",
        ),
    ] = 0.1
    weight_decay: Annotated[float, Field(ge=0, description="AdamW weight decay; 0 = none.")] = 0.0
    optim: str = Field(
        default="adamw_torch", description="Transformers optimizer name (TrainingArguments.optim)."
    )
    max_grad_norm: Annotated[
        float, Field(gt=0, description="Gradients are clipped to this global L2 norm.")
    ] = 1.0
    bf16: bool | None = Field(default=None, description="None = bf16 on GPUs that support it, fp32 on CPU.")
    gradient_checkpointing: bool = Field(
        default=True,
        description="Recompute activations during the backward pass to save GPU memory (slower). Paper: on.",
    )
    seed: int = Field(default=42, description="Seed of the Trainer: model initialisation and data order.")
    logging_steps: Annotated[
        int, Field(ge=1, description="Log training metrics every this many optimizer steps.")
    ] = 1
    save_steps: Annotated[
        int,
        Field(
            ge=1, description="Save a checkpoint every this many optimizer steps (training resumes from it)."
        ),
    ] = 500
    save_total_limit: Annotated[
        int | None,
        Field(ge=1, description="Checkpoints kept in output_dir, oldest deleted first; None = keep all."),
    ] = 2
    deepspeed: str | None = Field(default=None, description="Path of a DeepSpeed JSON config (ZeRO-3).")
    report_to: Literal["tensorboard", "mlflow", "wandb", "none"] = Field(
        default="tensorboard",
        description=(
            "Where the Trainer also sends its metrics (besides metrics.jsonl, always written): tensorboard "
            "(event files in output_dir/runs), mlflow (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME from the "
            "job's environment), wandb (WANDB_PROJECT, WANDB_API_KEY from the environment) or none. The "
            "package must be installed where the job runs; a missing one fails the job at its start."
        ),
    )


class SFTConfig(_TrainingHyperparameters):
    """Target-SFT on (x, y_ws). Paper: lr 7e-6, 1 epoch, batch 8x2x8, cosine, warmup 0.1, 2048.

    The authors pack examples into full-length sequences and put the loss on the whole text
    (TRL's SFTTrainer); by default we train one example per sequence with the prompt masked
    (`packing`, `loss_on_prompt` select their recipe).
    """

    learning_rate: Annotated[
        float, Field(gt=0, description="Peak learning rate, decayed by the schedule. Paper: 7e-6.")
    ] = 7e-6
    per_device_train_batch_size: Annotated[
        int,
        Field(
            ge=1, description="(x, y_ws) pairs per GPU per pass. Paper: 8 (x 2 accumulation x 8 GPUs = 128)."
        ),
    ] = 8
    gradient_accumulation_steps: Annotated[
        int,
        Field(
            ge=1,
            description="Micro-batches per optimizer step; not used when global_batch_size is set. Paper: 2.",
        ),
    ] = 2
    max_seq_length: Annotated[
        int, Field(ge=8, description="Most tokens of prompt + response in one example. Paper: 2048.")
    ] = 2048
    max_prompt_length: Annotated[
        int,
        Field(
            ge=4,
            description="When an example exceeds max_seq_length, its prompt is cut from the left to this "
            "many tokens (then the response at the right).",
        ),
    ] = 1800
    loss_on_prompt: bool = Field(
        default=False,
        description="Put the loss on the whole text, prompt and chat-template tokens included (the authors' "
        "recipe). Default off: the loss covers only the response, so the model learns what it should say, "
        "not to write users' prompts.",
    )
    packing: bool = Field(
        default=False,
        description="Pack whole examples into sequences of up to max_seq_length tokens (the authors' recipe: "
        "about 3x fewer optimizer steps at the same batch size and learning rate). Unlike TRL's packing, "
        "every example keeps its own positions and attends only to itself, and none is split across "
        "sequences; this needs a built-in transformers model (not custom modelling code). Default off: "
        "one example per sequence, the same for every model, and packing without that isolation would let "
        "examples attend across their boundaries.",
    )


SIMPO_MIN_BETA = 1.0
"""Smallest beta accepted with loss_type 'simpo' (DPO/WRPO use 0.01-0.5; SimPO 2-10 on averaged log-probs)."""


class WRPOConfig(_TrainingHyperparameters):
    """WRPO on (x, y_ws, y_wt, y_l). Paper: beta 0.01, alpha 0.1 rising linearly, lr 3e-7, batch 2x8x8."""

    learning_rate: Annotated[
        float, Field(gt=0, description="Peak learning rate, decayed by the schedule. Paper: 3e-7.")
    ] = 3e-7
    per_device_train_batch_size: Annotated[
        int,
        Field(
            ge=1,
            description="Quadruples (x, y_ws, y_wt, y_l) per GPU per pass. "
            "Paper: 2 (x 8 accumulation x 8 GPUs = 128).",
        ),
    ] = 2
    gradient_accumulation_steps: Annotated[
        int,
        Field(
            ge=1,
            description="Micro-batches per optimizer step; not used when global_batch_size is set. Paper: 8.",
        ),
    ] = 8
    beta: Annotated[
        float,
        Field(
            gt=0,
            description="Scale of the implicit reward log pi(y|x) - log pi_ref(y|x) in the loss "
            "(for 'simpo': of the length-normalised log pi(y|x)); smaller lets the policy move further "
            "from the reference. Paper: 0.01. 'simpo' needs its own scale, at least 1 (SimPO paper, "
            "Llama-3-8B-Instruct: 2.5): a smaller beta with 'simpo' is an error.",
        ),
    ] = 0.01
    alpha: Annotated[
        float,
        Field(
            ge=0,
            le=1,
            description="Fusion coefficient: weight of y_ws (best source response) against y_wt (best "
            "Target-SFT response) in the chosen reward alpha*r(y_ws) + (1-alpha)*r(y_wt); the value "
            "alpha_schedule reaches at the last step. Paper: 0.1; 0 = DPO on (y_wt, y_l).",
        ),
    ] = 0.1
    alpha_schedule: str = Field(
        default="linear",
        description="'linear' (0 -> alpha over the optimizer steps), 'constant', or "
        "'package.module:function' taking (step, total_steps, alpha) and returning the alpha for that step.",
    )
    loss_type: Literal["sigmoid", "ipo", "simpo"] = Field(
        default="sigmoid",
        description="'sigmoid' = WRPO's Bradley-Terry loss (the paper's); 'ipo' = IPO's squared loss; "
        "'simpo' = SimPO's length-normalised, reference-free loss with margin simpo_gamma; each on the "
        "alpha-weighted chosen reward.",
    )
    label_smoothing: Annotated[
        float,
        Field(
            ge=0,
            lt=0.5,
            description="cDPO label smoothing: the assumed probability that a preference label is flipped "
            "(0 = none). Used by 'sigmoid' and 'simpo', ignored by 'ipo'.",
        ),
    ] = 0.0
    simpo_gamma: Annotated[float, Field(ge=0)] = Field(
        default=1.375,
        description="SimPO target reward margin, in reward units (only for loss_type 'simpo'). SimPO paper, "
        "Llama-3-8B-Instruct: 1.375 (gamma/beta 0.55 at beta 2.5).",
    )
    max_length: Annotated[
        int,
        Field(ge=8, description="Most tokens of prompt + response (each of y_ws, y_wt, y_l). Paper: 2048."),
    ] = 2048
    max_prompt_length: Annotated[
        int,
        Field(
            ge=4,
            description="When prompt + longest response exceed max_length, the prompt is cut from the left "
            "to this many tokens. Paper: 1800.",
        ),
    ] = 1800
    precompute_reference: bool = Field(
        default=True,
        description="Compute reference log-probs once and store them with the quadruples, so training "
        "holds only the policy; False re-runs the reference model every step as the authors' trainer does.",
    )
    pack_prompt: bool = Field(
        default=True,
        description="Encode each prompt once for its three responses: one sequence [prompt, y_ws, y_wt, y_l] "
        "per example, each response attending to the prompt and itself only, with its own positions, in the "
        "reference pass and in training. The log-probs, loss and gradients are those of one sequence per "
        "response up to float rounding, from fewer tokens. Needs a built-in Llama, Mistral, Qwen2/3, Gemma-2 "
        "or Phi-3 model with eager or sdpa attention and no sliding window shorter than max_length; otherwise "
        "it is turned off with a logged reason. False = one sequence per response, the prompt encoded three "
        "times (the authors' way).",
    )

    @field_validator("alpha_schedule")
    @classmethod
    def _known_schedule(cls, value: str) -> str:
        if value not in ("linear", "constant") and not re.match(r"^[\w.]+:\w+$", value):
            raise ValueError("must be 'linear', 'constant' or an import path 'package.module:function'")
        return value

    @model_validator(mode="after")
    def _prompt_fits(self) -> WRPOConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(  # names both fields, reported at the section (tests/test_config.py)
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length})"
            )
        return self

    @model_validator(mode="after")
    def _simpo_beta(self) -> WRPOConfig:
        if self.loss_type == "simpo" and self.beta < SIMPO_MIN_BETA:
            raise FieldProblem(
                "beta",
                f"beta {self.beta} is a DPO-scale beta, too small for loss_type 'simpo': SimPO's reward is the "
                f"per-token average log-prob, so it needs beta >= {SIMPO_MIN_BETA} (SimPO uses 2 to 10; SimPO "
                "paper, Llama-3-8B-Instruct: beta 2.5 with simpo_gamma 1.375); set wrpo.beta (training.beta "
                "in a job config)",
            )
        return self


class LaunchConfig(ConfigModel):
    """How a training job is launched: `local` = torchrun on this machine, `ray` = Ray Train workers.

    Absent from a job config, `wrpo train` trains in its own process (as before).
    """

    launcher: Literal["local", "ray"] = Field(
        default="local",
        description="'local' = torchrun on this machine (and each of nnodes); 'ray' = Ray Train workers.",
    )
    nproc_per_node: Annotated[int, Field(ge=1, description="local: processes per machine (one per GPU).")] = 1
    nnodes: Annotated[int, Field(ge=1, description="local: machines; run the same command on each.")] = 1
    master_addr: str = Field(
        default="127.0.0.1", description="local: rendezvous host (node 0 when nnodes > 1)."
    )
    master_port: Annotated[int | None, Field(ge=1, le=65535)] = Field(
        default=None, description="local: rendezvous port; None = a free port (29500 when nnodes > 1)."
    )
    ray_address: str | None = Field(
        default=None, description="ray: 'auto', 'ray://host:10001' or an address; None starts a local Ray."
    )
    num_workers: Annotated[int, Field(ge=1, description="ray: training workers (one per GPU).")] = 1
    use_gpu: bool | None = Field(
        default=None, description="ray: one GPU per worker; None = if the cluster has GPUs."
    )
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="ray: e.g. {CPU: 8, GPU: 1}; empty = Ray Train's default."
    )
    storage_path: str | None = Field(
        default=None,
        description="ray: where checkpoints persist (s3://bucket/prefix, NFS path); a retried or rerun job "
        "with the same run_name resumes from its newest checkpoint there. None = ~/ray_results.",
    )
    run_name: str | None = Field(
        default=None, description="ray: run name in storage; None = derived from output_dir."
    )
    max_failures: Annotated[
        int, Field(ge=-1, description="ray: worker-failure retries (-1 = unlimited).")
    ] = 0
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables for the training processes."
    )
    shared_output_dir: bool = Field(
        default=False,
        description="True when every machine sees the same output_dir (NFS): checkpoints are written once. "
        "False: each machine keeps its own copy of every checkpoint (needed to resume on local disks).",
    )

    @field_validator("storage_path")
    @classmethod
    def _root_url(cls, value: str | None) -> str | None:
        return None if value is None else checked_root_url(value, "launch.storage_path")

    @field_validator("run_name")
    @classmethod
    def _run_name_is_a_folder(cls, value: str | None) -> str | None:
        return None if value is None else checked_name(value, "launch.run_name")


def planned_world_size(launch: LaunchConfig | None) -> int:
    """How many training processes a job with this launch section runs.

    nproc_per_node x nnodes for torchrun, num_workers for Ray, 1 without a launch section.
    """
    if launch is None:
        return 1
    if launch.launcher == "ray":
        return launch.num_workers
    return launch.nproc_per_node * launch.nnodes


def gradient_accumulation(hp: _TrainingHyperparameters, world_size: int) -> int:
    """Micro-batches per optimizer step on `world_size` processes: from global_batch_size when it is set.

    ValueError naming the numbers when global_batch_size is not a multiple of
    per_device_train_batch_size x world_size.
    """
    if hp.global_batch_size is None:
        return hp.gradient_accumulation_steps
    per_pass = hp.per_device_train_batch_size * world_size
    if hp.global_batch_size % per_pass:
        raise ValueError(
            f"global_batch_size {hp.global_batch_size} is not a multiple of per_device_train_batch_size "
            f"{hp.per_device_train_batch_size} x {world_size} processes = {per_pass}"
        )
    return hp.global_batch_size // per_pass


def planned_global_batch(hp: _TrainingHyperparameters, launch: LaunchConfig | None) -> int:
    """Examples per optimizer step of a job with these settings and launch section (see planned_world_size)."""
    world_size = planned_world_size(launch)
    return hp.per_device_train_batch_size * gradient_accumulation(hp, world_size) * world_size


class _JobConfig(ConfigModel):
    """What both job configs check: their global batch divides over the planned processes."""

    @model_validator(mode="after")
    def _global_batch_divides(self) -> _JobConfig:
        try:
            planned_global_batch(self.training, self.launch)
        except ValueError as error:
            raise FieldProblem("training.global_batch_size", str(error)) from None
        return self


class SFTJobConfig(_JobConfig):
    """A Target-SFT training job: `wrpo train sft --config FILE`."""

    model: str = Field(description="Hub id or local folder of the target model.")
    revision: str | None = Field(
        default=None,
        description="Hub commit, tag or branch of `model` to train from; None = main (or as stored).",
    )
    data: str = Field(description="Parquet file (BEST_SOURCE schema) with the (x, y_ws) pairs.")
    output_dir: str = Field(description="Folder for checkpoints and the final model (Hugging Face format).")
    trust_remote_code: bool = Field(
        default=False, description="Run the custom modelling code of the model's repository when loading it."
    )
    training: SFTConfig = Field(
        default_factory=SFTConfig, description="SFT hyper-parameters (the paper's by default)."
    )
    launch: LaunchConfig | None = Field(default=None, description="None = train in this process.")


class WRPOJobConfig(_JobConfig):
    """A WRPO training job: `wrpo train wrpo --config FILE`."""

    model: str = Field(description="Hub id or local folder of Target-SFT (the policy's start).")
    reference_model: str | None = Field(
        default=None, description="Frozen reference; defaults to `model` (Target-SFT), as in the paper."
    )
    data: str = Field(description="Quadruples: Parquet (QUADRUPLES schema) or the authors' JSONL format.")
    output_dir: str = Field(description="Folder for checkpoints and the final model (Hugging Face format).")
    trust_remote_code: bool = Field(
        default=False, description="Run the custom modelling code of the model's repository when loading it."
    )
    training: WRPOConfig = Field(
        default_factory=WRPOConfig, description="WRPO hyper-parameters (the paper's by default)."
    )
    launch: LaunchConfig | None = Field(default=None, description="None = train in this process.")
