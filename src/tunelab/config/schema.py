"""The typed configuration: the single source of defaults and field documentation.

Each section belongs to the package of the same name (``data``, ``model``, ``method``, ``train``, ``eval``).
Unknown keys are errors (``extra="forbid"``): a typo must never silently become a default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DatasetFormat = Literal["auto", "alpaca", "sharegpt", "messages", "text", "preference"]
Dtype = Literal["auto", "fp32", "fp16", "bf16"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]
MethodName = Literal[
    "full", "freeze", "lora", "dora", "qlora", "prefix", "ptuning", "prompt_tuning", "ia3", "hybrid"
]
Stage = Literal["sft"]
Batching = Literal["padding_free", "padded", "packed", "length_grouped"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"]
Optimizer = Literal[
    "adamw_torch_fused", "adamw_torch", "adafactor", "sgd", "adagrad", "rmsprop",
    "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "lion_32bit", "paged_lion_8bit",
    "paged_lion_32bit", "ademamix", "ademamix_8bit", "paged_ademamix_8bit", "paged_ademamix_32bit",
    "adamw_torch_8bit", "adamw_torch_4bit",
]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class DatasetSpec(Section):
    path: str
    """A JSON, JSONL, CSV or Parquet file."""
    format: DatasetFormat = "auto"
    """How records are laid out; ``auto`` detects it from the first record's keys."""
    weight: float = Field(1.0, gt=0)
    """Relative share of this dataset in the training mix: each source is sampled to ``weight / sum of weights`` of
    the sources' combined training size. When every weight is 1 (the default) the sources are simply concatenated,
    each record once; equal weights other than 1 (e.g. 2 and 2) give equal shares."""


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
    batching: Batching = "padding_free"
    """How training batches are laid out. ``padding_free``: the same samples and steps as ``padded``, flattened into
    one row without padding, attention kept within each sample (models that cannot fall back to ``padded``, with a
    message). ``padded``: each batch padded to its longest sample. ``packed``: samples bin-packed into rows of
    ``cutoff_len`` tokens first (fewer, fuller steps; samples still never attend to each other).
    ``length_grouped``: padded batches of similar-length samples (transformers' group_by_length)."""
    cache_tokenized: bool = True
    """Keep tokenized examples on disk, keyed by the data files, tokenizer, template and every setting that
    shapes them; a second run with the same inputs skips tokenization."""
    cache_dir: str | None = None
    """Folder of the tokenized-data cache; ``null`` uses ``$XDG_CACHE_HOME/tunelab/tokenized`` (else
    ``~/.cache/tunelab/tokenized``)."""
    tokenize_workers: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    """Processes that tokenize in parallel (1 tokenizes in this process). ``auto``: one per usable CPU (shared among
    the training processes of a machine), at most 8, for data sets of 4,096 records or more; smaller ones tokenize
    in this process, which is faster than starting workers for them. Results are the same either way."""

    @model_validator(mode="after")
    def _custom_template_needs_definition(self) -> DataConfig:
        if self.template == "custom" and self.custom_template is None:
            raise ValueError("template 'custom' needs a custom_template section")
        return self


class RopeScaling(Section):
    type: Literal["linear", "dynamic"]
    """``linear`` divides positions by ``factor`` (position interpolation, needs fine-tuning); ``dynamic`` rescales
    the base only past the trained length (NTK-aware)."""
    factor: float = Field(gt=1)
    """Context extension factor, e.g. 2.0 doubles the usable length."""


class ModelConfig(Section):
    name_or_path: str = ""
    """A hub id or a local folder holding a transformers model."""
    dtype: Dtype = "auto"
    """Weight precision. ``auto``: on a GPU bf16 where it runs natively, else fp16 (tensor cores), else fp32; when
    training on a CPU, bf16 autocast if the processor computes bf16 natively (AMX or AVX512_BF16), else fp32
    (evaluation and serving on a CPU stay fp32). The choice and its reason are printed and stored in summary.json."""
    attn_implementation: AttnImplementation | None = None
    """Attention kernel; ``null`` lets transformers choose (sdpa when available)."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust its author."""
    rope_scaling: RopeScaling | None = None
    """Stretch rotary position embeddings to extend the context, e.g. ``{type: linear, factor: 2.0}``; written to
    the model config (and saved with it). ``null`` keeps the checkpoint's own setting."""
    new_special_tokens: list[str] = Field(default_factory=list)
    """Tokens added to the tokenizer (e.g. ``["<tool_call>"]``); embeddings are resized and the new rows train
    (full/freeze/hybrid: the embedding matrix; LoRA/DoRA/QLoRA: only the new rows, via peft trainable tokens)."""


class LoraSettings(Section):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    """``all-linear`` or explicit module names such as ``[q_proj, v_proj]``."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(rank) instead of alpha/rank."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full beside the adapters and saved with them, e.g. ``[lm_head, embed_tokens]``."""


class FreezeSettings(Section):
    trainable_layers: int | list[int] = 2
    """How many of the last decoder layers train, or an explicit list of layer indices (negatives count from the
    end); 0 or ``[]`` when only ``trainable_patterns`` decide."""
    trainable_patterns: list[str] = Field(default_factory=list)
    """Regular expressions searched in parameter names (e.g. ``'mlp\\.'``, ``'layers\\.0\\.self_attn'``); every
    match trains too. A pattern that matches nothing is an error."""
    train_embeddings: bool = False
    train_head: bool = False

    @field_validator("trainable_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return patterns


class PrefixSettings(Section):
    num_virtual_tokens: int = Field(20, ge=1)
    """Learned key/value pairs prepended in every layer."""
    prefix_projection: bool = False
    """Produce the prefix through a two-layer MLP (more parameters, often steadier training)."""
    encoder_hidden_size: int = Field(512, ge=1)
    """Hidden size of that MLP (with ``prefix_projection`` only)."""


class PtuningSettings(Section):
    num_virtual_tokens: int = Field(20, ge=1)
    """Learned input embeddings prepended to every sample, produced by the prompt encoder."""
    encoder_hidden_size: int = Field(128, ge=1)
    """Hidden size of the prompt encoder."""
    encoder_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_num_layers: int = Field(2, ge=1)
    encoder_dropout: float = Field(0.0, ge=0, lt=1)


class PromptTuningSettings(Section):
    num_virtual_tokens: int = Field(20, ge=1)
    """Learned input embeddings prepended to every sample."""
    init_text: str | None = None
    """Start the virtual tokens from the embeddings of this text (e.g. ``"Answer the shopping request as JSON:"``);
    ``null`` starts them at random."""


class IA3Settings(Section):
    target_modules: Literal["all-linear"] | list[str] | None = None
    """Modules whose activations are rescaled; ``null`` uses peft's default for the architecture (attention k/v and
    the MLP down projection)."""
    feedforward_modules: list[str] | None = None
    """Which of ``target_modules`` are feed-forward (scaled at their input, not output); ``null``: peft's default
    with default targets, none with explicit ``target_modules``."""

    @model_validator(mode="after")
    def _feedforward_within_targets(self) -> IA3Settings:
        if self.feedforward_modules is not None and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(f"feedforward_modules {extra} are not in target_modules")
        return self


class QLoraSettings(Section):
    bits: Literal[4, 8] = 4
    """Precision of the frozen base weights (bitsandbytes); LoRA adapters on top train in higher precision."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type; nf4 suits normally distributed weights (the QLoRA paper's choice)."""
    double_quant: bool = True
    """Also quantise the quantisation constants (about 0.4 bits per weight saved)."""
    compute_dtype: Dtype = "auto"
    """Precision of the matmuls on dequantised weights; ``auto`` follows ``model.dtype``."""


class HybridSettings(Section):
    full_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of the optimizer steps trained as full fine-tuning before switching to LoRA (``method.lora``)."""


class MethodConfig(Section):
    name: MethodName = "lora"
    """full: every weight; freeze: chosen layers or parameter patterns; lora/dora: low-rank adapters via peft; qlora:
    LoRA on a 4/8-bit base (bitsandbytes); prefix/ptuning/prompt_tuning: learned virtual tokens; ia3: learned
    activation scales; hybrid: full fine-tuning, then LoRA."""
    lora: LoraSettings = Field(default_factory=LoraSettings)
    """Adapter settings of lora, dora, qlora and the LoRA phase of hybrid."""
    freeze: FreezeSettings = Field(default_factory=FreezeSettings)
    qlora: QLoraSettings = Field(default_factory=QLoraSettings)
    prefix: PrefixSettings = Field(default_factory=PrefixSettings)
    ptuning: PtuningSettings = Field(default_factory=PtuningSettings)
    prompt_tuning: PromptTuningSettings = Field(default_factory=PromptTuningSettings)
    ia3: IA3Settings = Field(default_factory=IA3Settings)
    hybrid: HybridSettings = Field(default_factory=HybridSettings)


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
    max_steps: int = Field(-1, ge=-1)
    """Positive: stop after this many optimizer steps (overrides num_train_epochs); -1: num_train_epochs decides."""

    @field_validator("max_steps")
    @classmethod
    def _steps_not_zero(cls, value: int) -> int:
        if value == 0:  # transformers would train one step
            raise ValueError("0 trains nothing; give a positive number of steps, or -1 for num_train_epochs")
        return value

    per_device_train_batch_size: int = Field(4, ge=1)
    per_device_eval_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    seed: int = 42
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    """Validation loss every N steps; ``null`` evaluates once per epoch when there is a validation split."""
    save_steps: int = Field(500, ge=1)
    save_total_limit: int | None = Field(3, ge=1)
    stop_on_nonfinite_loss: bool = True
    """Stop the run with an error when the training loss becomes NaN or infinite."""
    report_to: Literal["auto", "none", "tensorboard"] = "auto"
    """``auto`` logs to TensorBoard when it is installed."""
    lean_loss: bool = True
    """Run the LM head only where labels are supervised, in chunks (fused on GPU with liger-kernel installed):
    the same loss, without a tokens × vocabulary logit tensor. Models whose logits are not the plain head of
    the last hidden state keep their own loss (with a message)."""
    lean_activations: bool = True
    """Decoder layers (Llama, Qwen2/3, Mistral) keep fewer tensors for the backward pass and remake the cheap ones
    there: the SwiGLU product and SiLU output, the RMSNorms' outputs and normalized inputs, and the padding-free
    attention's joined output. Same gradients bit for bit; on the peer bench's LoRA job (CPU) 23% less peak RSS
    for about 5% slower steps (bench/RESULTS.md). Steps too short to keep the device busy pay more: 22–23% more host
    time (bench/step_overhead.py); on an H100 such steps ran about 1.3× faster with it off, for 39% more training memory
    (gradient checkpointing saves far more when memory is short); a profile put that cost on the host (the GPU's own
    work differed by 7%). Off by itself under ``torch_compile``, ``liger_kernel`` and ``gradient_checkpointing``,
    which recompute in their own way, and under ``activation_offload``, which moves every saved tensor."""
    master_weights: Literal["auto", "params", "optimizer"] = "auto"
    """Where the fp32 copy of trained bf16 weights lives (full, freeze, hybrid's full phase, and bf16 weights that
    train beside adapters such as ``modules_to_save``; LoRA adapters are fp32 themselves). ``params``: the trained
    weights are fp32 in the model and compute runs under bf16 autocast, which casts them (and each projection's
    input) at every forward, with an fp32 residual stream. ``optimizer``: the model keeps them in bf16 and the
    optimizer updates fp32 copies, with micro-batches' gradients summed in fp32 (as DeepSpeed's bf16 optimizer and
    FSDP mixed precision do): no per-forward casts and a bf16 residual stream, for the same bytes per trained weight
    at a step's peak. On an H100, 3B full fine-tuning ran 1.29x the steps per second with ``optimizer`` (44% MFU
    compiled, bench/RESULTS.md GPU pass 6); on a CPU bf16 weights are slower. Needs ``model.dtype`` bf16 and a
    single process; checkpoints keep the fp32 copies for an exact resume. ``auto`` (default): ``optimizer`` for bf16
    on a CUDA GPU in a single, unsharded process (unless resuming a checkpoint written with fp32 weights),
    ``params`` otherwise; the choice and its reason are printed and kept in summary.json."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them: less memory, about a third more compute.
    Non-reentrant checkpointing, so it also works when the base is frozen (LoRA, freeze)."""
    checkpoint_long_batches: bool = True
    """Without ``gradient_checkpointing``: a batch with more token slots than ``long_batch_percentile`` of this run's
    batches recomputes just enough decoder layers in the backward pass (the first ``k`` of ``L``, ``k = ceil(L *
    (1 - reference / tokens))``) that it keeps about the activations of the reference batch; all other batches run
    with nothing recomputed. The run's peak memory is then set by a typical batch, not by its longest outlier, for
    the recompute of a few batches (one epoch of the peer bench's full fine-tuning on a CPU: peak RSS 1,777 instead
    of 1,955 MB at 0.99x the speed; bench/RESULTS.md). The reference is estimated before training from the training
    rows' lengths, over batches made as training makes them (random, or transformers' length-grouped order for
    ``data.batching=length_grouped``; a flat batch's slots are its tokens, a padded one's its rows times its
    longest). Only layers that keep activations count: under ``method: freeze`` the frozen layers before the first
    trained one keep nothing, so ``L`` is the layers from there on. The line it prints and ``long_batches`` in
    summary.json say what it did (batches that recomputed, layer calls that went through the checkpoint). Same
    losses and gradients (tested).
    Off under ``torch_compile`` (a flag that changes per batch would recompile the layers), with FSDP or DeepSpeed,
    and for ``method: prefix`` (its KV-cache prefix cannot be recomputed)."""
    long_batch_percentile: float = Field(90.0, gt=0, lt=100)
    """The reference of ``checkpoint_long_batches``: the percentile of the run's micro-batch sizes (token slots)
    whose activations a longer batch keeps to. Lower keeps less memory and recomputes in more batches."""
    activation_offload: bool = False
    """Move the activations saved for the backward pass to (pinned) CPU memory during the forward, and back for the
    backward: less GPU memory, slower steps (each saved tensor crosses the PCIe bus twice). With
    ``gradient_checkpointing`` only each layer's input is saved, so together they keep the least on the GPU. Needs
    a CUDA GPU."""
    torch_compile: bool = False
    """Compile each decoder layer with ``torch.compile`` (one compiled graph serves every layer; the padding-free
    attention stays eager). The first steps are slower while it compiles: summary.json reports that time as
    ``compile_s`` and leaves it out of tokens/s. Inductor on a CPU needs a C++ compiler."""
    liger_kernel: bool = False
    """Liger-kernel's fused Triton kernels for RMSNorm, SwiGLU and RoPE (the LM head and loss are the lean loss's,
    which uses Liger's fused linear cross-entropy on CUDA whenever it is installed): shorter steps and less
    activation memory, the same results to rounding. Needs a CUDA GPU and ``pip install 'tunelab[gpu]'``; Llama,
    Qwen2/3, Mistral, Gemma, GLM-4 and the other model types liger-kernel lists. Not together with
    ``torch_compile`` (dynamo does not trace Liger's kernels); compile alone was faster on an H200."""
    torch_compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    """``inductor`` generates fused kernels (the speed-up); ``aot_eager`` traces the forward and backward graphs and
    runs them eagerly: no speed-up and no compiler needed, for checking that a model compiles."""
    cpu_allocator: Literal["auto", "system", "jemalloc", "mimalloc", "tcmalloc"] = "auto"
    """The malloc behind the process's CPU memory, preloaded (``LD_PRELOAD``) when ``tunelab train`` or ``tunelab
    demo`` starts, on Linux. Training frees and re-makes tensors of the same shapes layer after layer, which
    fragments glibc's heap: that is most of a CPU run's peak RSS (bench/RESULTS.md, "Allocator"). ``auto``: on a
    machine without a GPU, jemalloc, else mimalloc (tunelab's install brings it on Linux x86_64 and aarch64),
    else tcmalloc; the system allocator with a GPU or when none is installed. A named one that is not installed is
    an error. Freed pages are kept for reuse (unless the allocator's own setting is in the environment): peak RSS
    is what it is, and steps do not fault the pages in again."""
    cpu_release_memory: bool = True
    """On a CPU, hand the allocator's freed pages back to the kernel just before a batch with more tokens than any
    before it (jemalloc, mimalloc, tcmalloc or glibc's malloc, whichever serves the process). The kept pages are
    holes of the earlier, smaller batches' sizes; released, the largest batch lays its tensors out in fresh pages
    and the run's peak RSS is that batch's own: 1,555 instead of 1,636 MB in the peer bench's full fine-tuning
    (bench/RESULTS.md). It happens a few times a run, so the cost is not measurable. No effect on a GPU."""
    optim: Optimizer = "adamw_torch_fused"
    """Optimizer, by its transformers name. The bitsandbytes ones keep optimizer state in 8 bits (``*_8bit``,
    about a quarter of AdamW's state memory) or page it to CPU memory under GPU memory pressure (``paged_*``,
    CUDA only); they need bitsandbytes (``pip install 'tunelab[gpu]'``). ``adamw_torch_8bit``/``adamw_torch_4bit``
    are torchao's AdamW with 8- or 4-bit state (same extra), compiled with torch.compile (a CPU needs a C++
    compiler), without bitsandbytes' device synchronisation after every tensor."""

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
    base_cache_dir: str | None = None
    """A folder that keeps the base model's columns (base, few-shot, probe) keyed by everything they depend on
    (base model files, template, eval settings, test and few-shot samples): a later run with the same key copies
    them instead of generating again. ``tunelab sweep`` sets it so the base is evaluated once per sweep."""


class TunelabConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _after_training_eval_needs_a_test_split(self) -> TunelabConfig:
        # Checked here, not when the evaluation starts: that would be after the whole training run.
        if self.eval.after_training and self.data.test_size == 0:
            raise ValueError("eval.after_training needs a held-out test split: set data.test_size (e.g. 0.1)")
        return self
