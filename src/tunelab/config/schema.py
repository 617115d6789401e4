"""The typed configuration: the single source of defaults and field documentation.

Each section belongs to the package of the same name (``data``, ``model``, ``method``, ``train``, ``eval``).
Unknown keys are errors (``extra="forbid"``): a typo must never silently become a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DatasetFormat = Literal["auto", "alpaca", "sharegpt", "messages", "text", "preference"]
Dtype = Literal["auto", "fp32", "fp16", "bf16"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]
MethodName = Literal["full", "freeze", "lora", "dora"]
Stage = Literal["sft"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class DatasetSpec(Section):
    path: str
    """A JSON, JSONL, CSV or Parquet file."""
    format: DatasetFormat = "auto"
    """How records are laid out; ``auto`` detects it from the first record's keys."""
    weight: float = Field(1.0, gt=0)
    """Relative share of this dataset in the training mix."""


class CustomTemplate(Section):
    """A prompt format written out as strings; ``{content}`` marks where a turn's text goes."""

    system: str = "{content}\n\n"
    user: str = "{content}\n"
    assistant: str = "{content}"
    """Everything the model must learn to produce for an answer, end-of-turn marker included."""
    generation_prompt: str = ""
    """Text placed between a user turn and the answer (the model sees it, it is never supervised)."""
    default_system: str | None = None


class DataConfig(Section):
    datasets: list[DatasetSpec] = Field(default_factory=list)
    """Training data files; their train/validation/test splits are made by ``val_size`` and ``test_size``."""
    template: str | None = None
    """Prompt template: ``null`` uses the tokenizer's chat template (falling back to ``chatml``), or a name:
    alpaca, chatml, qwen, llama3, custom (then ``custom_template`` defines it)."""
    custom_template: CustomTemplate | None = None
    cutoff_len: int = Field(1024, ge=8)
    """Maximum tokens per sample; longer samples lose history and prompt text before any answer text."""
    train_on: Literal["all_turns", "last_turn"] = "all_turns"
    """Which assistant turns carry loss."""
    val_size: float = Field(0.0, ge=0)
    """Validation share (a fraction < 1) or count (>= 1)."""
    test_size: float = Field(0.0, ge=0)
    """Held-out test share (a fraction < 1) or count (>= 1); written to the run folder, never trained on."""
    seed: int = 42
    """Seed of the train/validation/test split."""
    on_bad_record: Literal["error", "skip"] = "error"
    """``error`` stops at the first malformed record; ``skip`` drops it and writes it to rejects.jsonl."""

    @model_validator(mode="after")
    def _custom_template_needs_definition(self) -> DataConfig:
        if self.template == "custom" and self.custom_template is None:
            raise ValueError("template 'custom' needs a custom_template section")
        return self


class ModelConfig(Section):
    name_or_path: str = ""
    """A hub id or a local folder holding a transformers model."""
    dtype: Dtype = "auto"
    """Weight precision; ``auto`` picks bf16 on GPUs that support it, else fp32."""
    attn_implementation: AttnImplementation | None = None
    """Attention kernel; ``null`` lets transformers choose (sdpa when available)."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust its author."""


class LoraSettings(Section):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    """``all-linear`` or explicit module names such as ``[q_proj, v_proj]``."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(rank) instead of alpha/rank."""


class FreezeSettings(Section):
    trainable_layers: int | list[int] = 2
    """How many of the last decoder layers train, or an explicit list of layer indices (negatives count from the
    end)."""
    train_embeddings: bool = False
    train_head: bool = False


class MethodConfig(Section):
    name: MethodName = "lora"
    """full: every weight; freeze: chosen layers; lora/dora: low-rank adapters via peft."""
    lora: LoraSettings = Field(default_factory=LoraSettings)
    freeze: FreezeSettings = Field(default_factory=FreezeSettings)


class TrainConfig(Section):
    stage: Stage = "sft"
    output_dir: str = "runs/tunelab"
    resume: bool | str = False
    """``false``; ``true`` continues from the latest complete checkpoint in output_dir; or a checkpoint path."""
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler_type: Scheduler = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    num_train_epochs: float = Field(3.0, gt=0)
    max_steps: int = -1
    """Positive: stop after this many optimizer steps (overrides num_train_epochs)."""
    per_device_train_batch_size: int = Field(4, ge=1)
    per_device_eval_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    seed: int = 42
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = None
    """Validation loss every N steps; ``null`` evaluates once per epoch when there is a validation split."""
    save_steps: int = Field(500, ge=1)
    save_total_limit: int | None = Field(3, ge=1)
    stop_on_nonfinite_loss: bool = True
    """Stop the run with an error when the training loss becomes NaN or infinite."""
    report_to: Literal["auto", "none", "tensorboard"] = "auto"
    """``auto`` logs to TensorBoard when it is installed."""

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)


class EvalConfig(Section):
    after_training: bool = False
    """Evaluate base and fine-tuned models on the test split when training ends and write the report."""
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    max_samples: int | None = Field(None, ge=1)
    """Evaluate at most this many test samples (all when ``null``)."""
    answer_kind: Literal["auto", "json", "label", "text"] = "auto"
    """How answers are scored: ``auto`` decides per sample from its reference (JSON -> structured, a small repeated
    label set -> classification, else text similarity); a kind scores every sample that way."""
    exact_match: Literal["normalized", "strict"] = "normalized"
    """``normalized`` ignores whitespace runs, case and full-width/half-width differences; ``strict`` compares
    characters as they are."""
    embedding_model: str | None = None
    """A local sentence-transformers folder: adds ``embedding_cosine`` for text answers (left out, with the reason
    printed, when it cannot be loaded; never downloaded)."""
    fewshot_k: int = Field(3, ge=0)
    """Also evaluate the base model prompted with this many training examples (0 turns the baseline off)."""
    forgetting_probe: bool = True
    """Also evaluate base and fine-tuned models on the bundled general-ability probe."""
    probe_max_samples: int | None = Field(None, ge=1)


class TunelabConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
