"""Loading and shaping teachers and students.

Everything that can go wrong when pairing two language models (an unreachable
hub id, a missing folder, tokenizers that disagree, a padded embedding) is
turned into a ``ModelError`` that says what to do, before any training starts.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from foundry_kernel._isolation import GLOBAL_RNG_LOCK, seeded_global_rng
from foundry_kernel._token_bytes import teacher_coverage
from foundry_kernel.config import StudentConfig, looks_like_path
from foundry_kernel.errors import ModelError
from foundry_kernel.paths import allowed_roots, resolve_within

log = logging.getLogger("foundry.models")

MODEL_BUILD_LOCK = threading.RLock()
"""Held while a model is *constructed*, and only then.

transformers builds models under process-global switches (a meta-device context during
``from_pretrained``, patched ``torch.nn.init`` functions, the default dtype), so a model
built in one thread while another thread builds one can come out on the meta device or
uninitialised. So every construction holds this lock: ``from_pretrained`` of a local
folder (construction plus reading its weights), ``from_config``, ``seeded_init`` and the
deep copy of ``student_from_teacher``. What does not construct a model runs outside it:
hub downloads (:func:`fetch_hub_model`, which can take minutes and must not stop every
other run's build), tokenizers and configs. Runs still train concurrently.
"""

Check = Callable[[], None]

# Config attributes (standard names, which a family's attribute_map translates) a fresh
# student overrides on a copy of the teacher's config.
_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads")
# Where families keep their MLP width (the first one a config has is used) and the
# widths of their experts (mixture-of-experts families).
_MLP_WIDTH_KEYS = ("intermediate_size", "n_inner", "ffn_dim")
_EXPERT_WIDTH_KEYS = ("moe_intermediate_size", "shared_expert_intermediate_size")


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str

    @property
    def params(self) -> int:
        return count_params(self.model)


def count_params(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def load_causal_lm(
    source: str,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    field: str = "teacher.source",
    weights: bool = True,
    check: Check | None = None,
) -> LoadedModel:
    """``from_pretrained`` on a local folder or a hub id, with errors a user can act on.

    ``weights=False`` builds the model on the meta device from its config alone: its
    shape, class and parameter count without its memory, for a teacher that runs in a
    server (a student can still be shaped after it).

    A hub id is first brought into the local hub cache by :func:`fetch_hub_model`
    (outside :data:`MODEL_BUILD_LOCK`; ``check`` - a run's ``ctx.check`` - runs per file
    and per downloaded chunk), then loaded from that folder like a local one.
    """
    local = looks_like_path(source)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    hf_logging.disable_progress_bar()  # one bar per load floods notebooks and logs
    if local:
        where = resolve_within(source, allowed_roots(), field=field, must_exist=True)
        if not where.is_dir():
            raise ModelError(f"{field}: {str(where)!r} is not a model folder")
    try:
        if not local:
            where = fetch_hub_model(
                source, revision=revision, weights=weights, offline=offline, check=check
            )
        if check is not None:
            check()
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
        if weights:  # (weights a checkpoint lacks are initialised from the global RNG)
            with MODEL_BUILD_LOCK, GLOBAL_RNG_LOCK:
                model = AutoModelForCausalLM.from_pretrained(
                    where, dtype=dtype, local_files_only=True
                )
        else:
            config = AutoConfig.from_pretrained(where, local_files_only=True)
            with MODEL_BUILD_LOCK, torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, httpx.HTTPError) as exc:
        raise ModelError(_load_hint(field, source, local=local, offline=offline, exc=exc)) from exc
    except ValueError as exc:
        raise ModelError(f"{field}: {source!r} is not a causal language model: {exc}") from exc
    if weights:
        model.to(device)  # type: ignore[arg-type]  # transformers' stubs
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


_HUB_SUPPORT_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja")
"""Config, tokenizer and chat-template files at a hub repo's top level."""


def hub_files(names: Sequence[str], *, weights: bool) -> list[str]:
    """The files of a hub repo that ``from_pretrained`` reads: its top-level config and
    tokenizer files, plus (``weights``) its safetensors, or its PyTorch ``.bin`` files when it
    has no safetensors. Other formats (ONNX, GGUF, Flax, subfolders) are never fetched."""
    top = sorted(n for n in names if "/" not in n)

    def matching(patterns: Sequence[str]) -> list[str]:
        return [n for n in top if any(fnmatch.fnmatch(n, p) for p in patterns)]

    chosen = matching(_HUB_SUPPORT_FILES)
    if weights:
        tensors = matching(("*.safetensors",))
        chosen += tensors or matching(("pytorch_model*.bin",))
    return sorted(set(chosen))


def fetch_hub_model(
    repo: str,
    *,
    revision: str | None,
    weights: bool,
    offline: bool,
    check: Check | None = None,
) -> Path:
    """The local snapshot folder of hub model ``repo``, downloading what the cache lacks.

    Runs outside :data:`MODEL_BUILD_LOCK`: a download is network time, not model
    construction, and holding the lock across it made one slow download stall every other
    run's build. Files are fetched one at a time (pinned to the revision's commit, so the
    snapshot is consistent) with ``check`` before each file and at each chunk
    huggingface_hub reports (10 MB): a cancel stops a download there, leaving
    huggingface_hub's own resumable ``.incomplete`` file, never a file under its final name.
    Offline (``HF_HUB_OFFLINE``), the cached snapshot is used as it is.
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    if offline:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    info = HfApi().model_info(repo, revision=revision)
    names = hub_files([s.rfilename for s in info.siblings or ()], weights=weights)
    if not any(n == "config.json" for n in names):
        raise ModelError(f"hub model {repo!r} has no config.json at its top level")
    progress = None if check is None else _checked_progress(check)
    folder: Path | None = None
    for name in names:
        if check is not None:
            check()
        path = Path(hf_hub_download(repo, name, revision=info.sha, tqdm_class=progress))
        folder = path.parent
    assert folder is not None  # names holds config.json
    return folder


def _checked_progress(check: Check) -> Any:
    """A silent progress-bar class for huggingface_hub whose every update is a stop point
    (its ``tqdm_class`` parameter is the download loop's only callback)."""
    from tqdm.std import tqdm  # (not tqdm.auto: that one may import Jupyter widgets)

    class CheckedProgress(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            check()
            return super().update(n)

    return CheckedProgress


def _load_hint(field: str, source: str, *, local: bool, offline: bool, exc: BaseException) -> str:
    if local:
        return f"{field}: {source!r} is not a loadable model folder ({exc})"
    if offline:
        from huggingface_hub import constants

        return (
            f"{field}: could not load hub model {source!r}: HF_HUB_OFFLINE is set and the hub "
            f"cache ({constants.HF_HUB_CACHE}) has no snapshot of it ({exc}). Download it once "
            f"with network access (`hf download {source}`; it is then cached), set HF_HUB_CACHE "
            f"to the cache that holds it, or point {field} at a local folder."
        )
    return (
        f"{field}: could not load hub model {source!r} (the hub could not be reached: "
        f"{exc}). Download it once with network access (it is then cached), or point "
        f"{field} at a local folder."
    )


def build_student(
    cfg: StudentConfig,
    teacher: LoadedModel,
    *,
    device: torch.device,
    seed: int,
    check: Check | None = None,
    cross_tokenizer: bool = False,
) -> LoadedModel:
    """Make the student the config asks for; it shares the teacher's tokenizer unless
    ``cross_tokenizer`` (``loss.cross_tokenizer`` != off: a pretrained student keeps its
    own tokenizer, and the pairing check is skipped). ``check`` reaches a pretrained
    student's download (see :func:`load_causal_lm`)."""
    if cfg.init == "pretrained":
        if cfg.source is None:
            raise ModelError("student.source: required when student.init='pretrained'")
        student = load_causal_lm(cfg.source, device=device, field="student.source", check=check)
        if not cross_tokenizer:
            check_tokenizers(teacher.tokenizer, student.tokenizer)
        return student
    if cfg.init == "from_teacher":
        model = student_from_teacher(teacher.model, cfg.layers)
    else:
        model = fresh_student(teacher.model, cfg, seed=seed)
    model.to(device=device, dtype=torch.float32)  # type: ignore[call-arg]  # transformers' stubs
    return LoadedModel(model=model, tokenizer=teacher.tokenizer, source=f"{cfg.init}-student")


def fresh_student(teacher: PreTrainedModel, cfg: StudentConfig, *, seed: int) -> PreTrainedModel:
    """A randomly initialised copy of the teacher's architecture at the student's size.

    Works for any family through the config's standard names (``hidden_size``,
    ``num_hidden_layers``, ``num_attention_heads``), which a family's ``attribute_map``
    translates (GPT-2: ``n_embd``, ``n_layer``, ``n_head``): see :func:`student_overrides`.
    """
    sconf = student_config(teacher.config, cfg)
    return seeded_init(lambda: AutoModelForCausalLM.from_config(sconf, dtype=torch.float32), seed)


def student_config(tconf: Any, cfg: StudentConfig) -> Any:
    """The teacher's config with the student's shape (a new config object)."""
    overrides = student_overrides(tconf, cfg)
    mapping = getattr(tconf, "attribute_map", {}) or {}
    real = {mapping.get(k, k): v for k, v in overrides.items()}
    return type(tconf).from_dict({**tconf.to_dict(), **real})


def student_overrides(tconf: Any, cfg: StudentConfig) -> dict[str, Any]:
    """The config fields a fresh student changes, by their standard names.

    The MLP width goes to the family's field for it (``intermediate_size``, GPT-2's
    ``n_inner``, ``ffn_dim``); mixture-of-experts widths (``moe_intermediate_size``,
    ``shared_expert_intermediate_size``) shrink with it and the expert count stays the
    teacher's; per-layer lists (``layer_types``) are rebuilt by the config class for the new
    depth; dense-layer indices (``mlp_only_layers``) beyond it are dropped.
    """
    name = type(tconf).__name__
    missing = [k for k in _SHAPE_KEYS if not isinstance(getattr(tconf, k, None), int)]
    if missing:
        raise ModelError(
            f"student.init='fresh' needs the teacher config's {missing} (or their "
            f"attribute_map names); {name} has none. Use student.init='pretrained' with "
            "student.source instead."
        )
    hidden = cfg.hidden_size or tconf.hidden_size
    heads = cfg.num_heads or tconf.num_attention_heads
    if hidden % heads:
        raise ModelError(
            f"student.hidden_size={hidden} must be divisible by student.num_heads={heads}"
        )
    layers = cfg.num_layers or tconf.num_hidden_layers
    width = cfg.intermediate_size or _mlp_width(hidden)
    fields = tconf.to_dict()
    overrides: dict[str, Any] = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
    }
    mlp_fields = [k for k in _MLP_WIDTH_KEYS if k in fields]
    if mlp_fields:
        overrides[mlp_fields[0]] = width
    elif cfg.intermediate_size is not None:
        raise ModelError(
            f"student.intermediate_size: {name} has no MLP-width field "
            f"({', '.join(_MLP_WIDTH_KEYS)}); leave student.intermediate_size unset"
        )
    for key in _EXPERT_WIDTH_KEYS:
        if isinstance(fields.get(key), int) and fields[key] > 0:
            overrides[key] = min(fields[key], width)
    if "num_key_value_heads" in fields:
        overrides["num_key_value_heads"] = heads
    if isinstance(fields.get("head_dim"), int):
        old_head = fields["head_dim"]
        overrides["head_dim"] = hidden // heads
        if fields.get("query_pre_attn_scalar") == old_head:  # Gemma: scale by head_dim
            overrides["query_pre_attn_scalar"] = hidden // heads
    if fields.get("layer_types") is not None:
        overrides["layer_types"] = None
    if isinstance(fields.get("mlp_only_layers"), list):
        overrides["mlp_only_layers"] = [i for i in fields["mlp_only_layers"] if i < layers]
    return overrides


T = TypeVar("T")


def seeded_init(make: Callable[[], T], seed: int) -> T:
    """Build a model from ``seed`` alone, even with other runs initialising in other threads.

    Weight init draws from torch's process-global RNG (transformers' ``_init_weights``
    takes no generator), so it runs under both locks: the model-build lock (construction)
    and the global-RNG lock, inside a forked, seeded generator (``_isolation``).
    """
    with MODEL_BUILD_LOCK, seeded_global_rng(seed):
        return make()


def _mlp_width(hidden: int) -> int:
    """Llama's 8/3 x hidden, rounded up to a multiple of 16 for fast matmuls."""
    return -(-hidden * 8 // 3 // 16) * 16


def student_from_teacher(teacher: PreTrainedModel, layers: list[int] | None) -> PreTrainedModel:
    """Keep a subset of the teacher's decoder layers (DistilBERT/Minitron style).

    The decoder stack is found wherever the family keeps it (``model.layers``, GPT-2's
    ``transformer.h``, GPT-NeoX's ``gpt_neox.layers``: :func:`decoder_stack`). Kept layers
    are renumbered (every ``layer_idx``, which indexes the KV cache) and the config's
    per-layer fields follow them (``layer_types``, ``mlp_only_layers``); a cut the config
    cannot describe (its export would not reload) is refused.
    """
    path, stack = decoder_stack(teacher)
    n = len(stack)
    keep = kept_layers(n, layers)
    bad = [i for i in keep if i >= n]
    if bad:
        raise ModelError(f"student.layers: {bad} out of range; the teacher has layers 0..{n - 1}")
    with MODEL_BUILD_LOCK:
        student = copy.deepcopy(teacher)
    student.train().requires_grad_(True)  # the run froze its teacher (eval, no grad)
    stack_copy = student.get_submodule(path)
    assert isinstance(stack_copy, torch.nn.ModuleList)  # (decoder_stack found a ModuleList)
    kept = torch.nn.ModuleList(stack_copy[i] for i in keep)
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", new_idx)  # noqa: B010  (a module attribute)
    parent, _, attr = path.rpartition(".")
    setattr(student.get_submodule(parent) if parent else student, attr, kept)
    sconf = student.config
    sconf.num_hidden_layers = len(keep)  # (attribute_map: GPT-2's n_layer)
    if getattr(sconf, "layer_types", None) is not None:
        sconf.layer_types = [sconf.layer_types[i] for i in keep]
    dense = getattr(sconf, "mlp_only_layers", None)
    if isinstance(dense, list):
        sconf.mlp_only_layers = [new for new, old in enumerate(keep) if old in dense]
    _check_describable(student, keep)
    return student


def kept_layers(n: int, layers: list[int] | None) -> list[int]:
    """The teacher layers a from_teacher student keeps, in order: ``student.layers``, or
    every other one of the teacher's ``n`` (the hidden-state loss pairs them with these)."""
    return list(layers) if layers is not None else list(range(0, n, 2))


def decoder_stack(model: PreTrainedModel) -> tuple[str, torch.nn.ModuleList]:
    """The dotted path and module list of the model's decoder layers: the shallowest
    ``ModuleList`` of ``config.num_hidden_layers`` entries."""
    n = getattr(model.config, "num_hidden_layers", None)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if name and isinstance(module, torch.nn.ModuleList) and len(module) == n
    ]
    if not found:
        raise ModelError(
            f"student.init='from_teacher' needs the teacher's decoder layers; "
            f"{type(model).__name__} has no list of num_hidden_layers={n} modules. "
            "Use student.init='fresh' or 'pretrained'."
        )
    return min(found, key=lambda item: item[0].count("."))


def _check_describable(student: PreTrainedModel, keep: list[int]) -> None:
    """Refuse a cut student whose config builds a differently shaped model (its export
    would not reload): the config's model is built on the meta device and compared."""
    with MODEL_BUILD_LOCK, torch.device("meta"):
        rebuilt = AutoModelForCausalLM.from_config(student.config)
    want = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
        raise ModelError(
            f"student.layers={keep}: the kept layers differ from what "
            f"{type(student.config).__name__} describes for a {len(keep)}-layer model "
            f"(first difference: {diff[0]!r}), so the student could not be saved and "
            "reloaded. Keep other layers, or use student.init='fresh'."
        )


#: Text encoded by both tokenizers of a pair: equal vocabularies can still split text
#: differently (other merges or pre-tokenizer), and this catches the common cases.
_PROBE_TEXT = "Hello, world! The list object's append() method: x = [1, 2]\n\tcafé 日本 🙂"
_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "pad_token")


def check_tokenizers(teacher_tok: Any, student_tok: Any) -> None:
    """Raise ``ModelError`` unless both tokenizers map text to the same ids.

    Compares the full vocabularies (added tokens included), the special tokens,
    and the encoding of a probe string; the message names the first differences, and the
    ``loss.cross_tokenizer`` settings that distil across tokenizers instead, with how much
    of the teacher's vocabulary the student shares byte for byte (what ``aligned`` and
    ``hybrid`` compare over).
    """
    problems = [
        *_vocab_differences(teacher_tok.get_vocab(), student_tok.get_vocab()),
        *_special_token_differences(teacher_tok, student_tok),
        *_probe_differences(teacher_tok, student_tok),
    ]
    if problems:
        shared = teacher_coverage(teacher_tok, student_tok)
        raise ModelError(
            "teacher and student tokenizers differ, so their token distributions cannot "
            "be compared position by position: "
            + "; ".join(problems)
            + ". Use a student that shares the teacher's tokenizer (e.g. student.init="
            "'fresh' or 'from_teacher'), or set loss.cross_tokenizer=hybrid (or aligned / "
            f"uld) to distil across tokenizers; {shared:.1%} of the teacher's vocabulary has "
            "an exact match in the student's."
        )


def _vocab_differences(teacher: dict[str, int], student: dict[str, int]) -> list[str]:
    if teacher == student:
        return []
    problems = []
    if len(teacher) != len(student):
        problems.append(f"vocabulary sizes differ (teacher {len(teacher)}, student {len(student)})")
    by_id_teacher = {i: tok for tok, i in teacher.items()}
    by_id_student = {i: tok for tok, i in student.items()}
    for token_id in sorted(set(by_id_teacher) | set(by_id_student)):
        a, b = by_id_teacher.get(token_id), by_id_student.get(token_id)
        if a != b:
            problems.append(f"first differing id {token_id}: teacher {a!r}, student {b!r}")
            break
    return problems


def _special_token_differences(teacher_tok: Any, student_tok: Any) -> list[str]:
    problems = []
    for attr in _SPECIAL_ATTRS:
        a, b = getattr(teacher_tok, attr, None), getattr(student_tok, attr, None)
        a_id, b_id = (
            getattr(teacher_tok, f"{attr}_id", None),
            getattr(student_tok, f"{attr}_id", None),
        )
        if (a, a_id) != (b, b_id):
            problems.append(f"{attr} differs (teacher {a!r}={a_id}, student {b!r}={b_id})")
    return problems


def _probe_differences(teacher_tok: Any, student_tok: Any) -> list[str]:
    a = teacher_tok.encode(_PROBE_TEXT, add_special_tokens=False)
    b = student_tok.encode(_PROBE_TEXT, add_special_tokens=False)
    if a == b:
        return []
    first = next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )
    return [
        f"they split the same text differently from token {first} "
        f"(teacher {a[first : first + 3]}, student {b[first : first + 3]})"
    ]


def own_vocab_size(model: LoadedModel, role: str) -> int:
    """The real vocabulary of one model of a cross-tokenizer pair (each has its own): its
    tokenizer's size, which its output layer must cover (padded rows beyond it are never
    tokens, and are sliced off)."""
    n_tok = len(model.tokenizer)
    rows = model.model.get_output_embeddings().weight.shape[0]
    if rows < n_tok:
        raise ModelError(
            f"vocabulary mismatch: the {role}'s tokenizer has {n_tok} tokens but its output "
            f"layer only {rows} rows"
        )
    return n_tok


def shared_vocab_size(teacher: LoadedModel, student: LoadedModel) -> int:
    """Vocabulary the loss compares over, handling padded embedding matrices.

    Model families pad embeddings beyond the tokenizer (e.g. 152064 vs 151936
    rows); the extra rows are never real tokens, so the loss slices both
    logits to the tokenizer's size. Anything else is a true mismatch.
    """
    n_tok = len(teacher.tokenizer)
    sizes = {
        "teacher": teacher.model.get_output_embeddings().weight.shape[0],
        "student": student.model.get_output_embeddings().weight.shape[0],
    }
    small = {k: v for k, v in sizes.items() if v < n_tok}
    if small:
        raise ModelError(
            "vocabulary mismatch: the tokenizer has "
            f"{n_tok} tokens but "
            + " and ".join(f"the {k}'s output layer has only {v} rows" for k, v in small.items())
            + f" (teacher {sizes['teacher']}, student {sizes['student']} rows): token ids up "
            f"to {n_tok - 1} have no logit there, so these models cannot be distilled into "
            "each other. Use models whose output layers cover the tokenizer."
        )
    if len(set(sizes.values())) > 1 or sizes["teacher"] != n_tok:
        log.info("padded vocabularies %s; comparing the first %d logits", sizes, n_tok)
    return n_tok


#: Config fields (by their standard names; a family's attribute_map translates them, e.g.
#: GPT-2's ``n_positions``) that bound how many positions a model can attend over.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")


def context_limit(config: Any) -> tuple[int, str] | None:
    """The most positions the model takes, and the config field that says so (e.g.
    ``GPT2Config.n_positions``), or None when its config names no limit.

    A sliding window is no limit: it bounds how far each token looks back, not how long a
    sequence may be (the model still takes ``max_position_embeddings`` positions).
    """
    configs = [config]
    text = getattr(config, "get_text_config", None)
    if callable(text):
        inner = text()
        if inner is not config:
            configs.append(inner)
    for cfg in configs:
        mapping = getattr(cfg, "attribute_map", None) or {}
        for key in _CONTEXT_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value, f"{type(cfg).__name__}.{mapping.get(key, key)}"
    return None
