"""Tiny random models of real transformers families, built locally (no download).

Each family is its real config class at a tiny shape (hidden 64, head_dim 32 so vLLM's
CPU attention has a kernel, 3 layers so ``student.init=from_teacher`` renumbers a layer),
saved with ``save_pretrained`` next to a tokenizer in that family's format: a
``tokenizers`` BPE trained here on the built-in corpus (byte-level for GPT-2, GPT-NeoX,
Qwen, Llama 3 and OLMo 2; SentencePiece-style metaspace for Mistral, Gemma and Phi-3), that
family's special tokens, whether it adds BOS, its pad token (or none: GPT-2, GPT-NeoX,
Llama 3) and its chat template where the family has one.

Tests use :class:`Zoo` (``tests/test_families.py`` holds it in a session fixture): models
are built once per session, on first use, into a temporary folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from foundry_kernel.config import DataConfig
from foundry_kernel.data._sources import load_documents

#: BPE vocabulary trained per tokenizer style (special tokens included). Byte-level styles
#: start from 256 byte symbols, so this leaves ~190 merges: enough for real splits.
TOKENIZER_VOCAB = 448


@dataclass(frozen=True)
class TokenizerStyle:
    """One family's tokenizer conventions."""

    byte_level: bool  # GPT-2-style byte-level BPE, else SentencePiece-style metaspace BPE
    specials: tuple[str, ...]  # added tokens, in id order from 0
    bos: str | None
    eos: str
    pad: str | None
    unk: str | None = None
    add_bos: bool = False
    chat_template: str | None = None
    extra: tuple[str, ...] = ()  # additional special tokens (chat markers)
    tokenizer_class: str | None = None  # the class the family's tokenizer_config names


_LLAMA3_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_MISTRAL_CHAT = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
    "{{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
_GEMMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_PHI3_CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_OLMO2_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

STYLES: dict[str, TokenizerStyle] = {
    # Llama 3: byte-level, adds <|begin_of_text|>, no pad token.
    "llama3": TokenizerStyle(
        byte_level=True,
        specials=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        pad=None,
        add_bos=True,
        chat_template=_LLAMA3_CHAT,
        extra=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    # Qwen 2/2.5/3: byte-level, no BOS at all, <|endoftext|> is eos and pad, ChatML markers.
    "qwen": TokenizerStyle(
        byte_level=True,
        specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos=None,
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        chat_template=_CHATML,
        extra=("<|im_start|>", "<|im_end|>"),
        # Named as Qwen's checkpoints name it: transformers maps model_type qwen2 (only) to
        # this class, whose defaults (unk <|endoftext|>) would otherwise differ by family.
        tokenizer_class="Qwen2Tokenizer",
    ),
    # Mistral / Mixtral: SentencePiece <unk> <s> </s>, adds <s>, no pad token.
    "mistral": TokenizerStyle(
        byte_level=False,
        specials=("<unk>", "<s>", "</s>"),
        bos="<s>",
        eos="</s>",
        pad=None,
        unk="<unk>",
        add_bos=True,
        chat_template=_MISTRAL_CHAT,
    ),
    # Gemma 2/3: <pad>=0 <eos>=1 <bos>=2 <unk>=3, adds <bos>, turn markers.
    "gemma": TokenizerStyle(
        byte_level=False,
        specials=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        add_bos=True,
        chat_template=_GEMMA_CHAT,
        extra=("<start_of_turn>", "<end_of_turn>"),
    ),
    # Phi-3: Llama-2 SentencePiece ids, eos/pad <|endoftext|>, no BOS added, <|user|> etc.
    "phi3": TokenizerStyle(
        byte_level=False,
        specials=("<unk>", "<s>", "</s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"),
        bos="<s>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        unk="<unk>",
        chat_template=_PHI3_CHAT,
        extra=("<|user|>", "<|assistant|>", "<|end|>"),
    ),
    # GPT-2: byte-level, <|endoftext|> is bos, eos and unk; no pad token, no chat template.
    "gpt2": TokenizerStyle(
        byte_level=True,
        specials=("<|endoftext|>",),
        bos="<|endoftext|>",
        eos="<|endoftext|>",
        pad=None,
        unk="<|endoftext|>",
    ),
    # GPT-NeoX (Pythia): <|endoftext|>=0, <|padding|>=1 (in the vocabulary, not set as pad).
    "neox": TokenizerStyle(
        byte_level=True,
        specials=("<|endoftext|>", "<|padding|>"),
        bos="<|endoftext|>",
        eos="<|endoftext|>",
        pad=None,
        unk="<|endoftext|>",
    ),
    # OLMo 2 (dolma2): byte-level, <|endoftext|> bos/eos, <|pad|> pad.
    "olmo2": TokenizerStyle(
        byte_level=True,
        specials=("<|endoftext|>", "<|pad|>"),
        bos="<|endoftext|>",
        eos="<|endoftext|>",
        pad="<|pad|>",
        chat_template=_OLMO2_CHAT,
    ),
}


@dataclass(frozen=True)
class Family:
    """A transformers architecture at a tiny shape, with its tokenizer style."""

    name: str
    config_class: str  # in transformers
    style: str  # a key of STYLES
    shape: dict[str, Any]
    student_shape: dict[str, Any] = field(default_factory=dict)  # a pretrained student
    notes: str = ""


_DECODER = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 128,
}
_SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", "LlamaConfig", "llama3", dict(_DECODER), dict(_SMALL)),
        Family(
            "qwen2",
            "Qwen2Config",
            "qwen",
            {**_DECODER, "tie_word_embeddings": True},
            dict(_SMALL),
            notes="tied embeddings",
        ),
        Family(
            "qwen3",
            "Qwen3Config",
            "qwen",
            {**_DECODER, "head_dim": 32, "tie_word_embeddings": True},
            {**_SMALL, "head_dim": 32},
            notes="tied embeddings, q/k norms",
        ),
        Family(
            "mistral",
            "MistralConfig",
            "mistral",
            {**_DECODER, "sliding_window": 16},
            {**_SMALL, "sliding_window": 16},
            notes="sliding window (16 < seq_len here)",
        ),
        Family(
            "gemma2",
            "Gemma2Config",
            "gemma",
            {
                **_DECODER,
                "head_dim": 32,
                "query_pre_attn_scalar": 32,
                "sliding_window": 16,
                "final_logit_softcapping": 30.0,
                "attn_logit_softcapping": 50.0,
                "tie_word_embeddings": True,
            },
            {
                **_SMALL,
                "head_dim": 32,
                "query_pre_attn_scalar": 32,
                "sliding_window": 16,
                "final_logit_softcapping": 30.0,
                "attn_logit_softcapping": 50.0,
            },
            notes="logit and attention soft-capping, tied and scaled embeddings",
        ),
        Family(
            "gemma3",
            "Gemma3TextConfig",
            "gemma",
            {
                **_DECODER,
                "head_dim": 32,
                "query_pre_attn_scalar": 32,
                "sliding_window": 16,
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
                "tie_word_embeddings": True,
            },
            {
                **_SMALL,
                "head_dim": 32,
                "query_pre_attn_scalar": 32,
                "sliding_window": 16,
                "layer_types": ["sliding_attention", "full_attention"],
            },
            notes="text-only causal LM; sliding/full layer_types, scaled embeddings",
        ),
        Family(
            "phi3",
            "Phi3Config",
            "phi3",
            dict(_DECODER),
            dict(_SMALL),
            notes="fused qkv/gate_up projections",
        ),
        Family(
            "gpt2",
            "GPT2Config",
            "gpt2",
            {"n_embd": 64, "n_layer": 3, "n_head": 2, "n_positions": 64},
            {"n_embd": 32, "n_layer": 2, "n_head": 1, "n_positions": 64},
            notes="learned positions: n_positions is the context limit; no pad token",
        ),
        Family(
            "gpt_neox",
            "GPTNeoXConfig",
            "neox",
            {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 3,
                "num_attention_heads": 2,
                "max_position_embeddings": 128,
                "rotary_pct": 0.25,
            },
            {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 1,
                "max_position_embeddings": 128,
                "rotary_pct": 0.25,
            },
            notes="layers at gpt_neox.layers; partial rotary; no pad token",
        ),
        Family(
            "olmo2",
            "Olmo2Config",
            "olmo2",
            dict(_DECODER),
            dict(_SMALL),
            notes="post-norm, q/k norms",
        ),
        Family(
            "qwen2_moe",
            "Qwen2MoeConfig",
            "qwen",
            {
                **_DECODER,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 64,
                "mlp_only_layers": [1],
            },
            {
                **_SMALL,
                "num_experts": 2,
                "num_experts_per_tok": 1,
                "moe_intermediate_size": 16,
                "shared_expert_intermediate_size": 32,
            },
            notes="mixture of experts with a shared expert; layer 1 dense (mlp_only_layers)",
        ),
        Family(
            "mixtral",
            "MixtralConfig",
            "mistral",
            {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2},
            {**_SMALL, "num_local_experts": 2, "num_experts_per_tok": 1},
            notes="mixture of experts",
        ),
    )
}


@cache
def corpus_texts() -> tuple[str, ...]:
    """The built-in corpus's first documents (what the tests' runs train on), plus a
    line of non-ASCII text so no style is ASCII-only."""
    docs = load_documents(DataConfig(max_documents=40))
    return (*(d.text for d in docs), "café naïve 日本語 🙂 — “quotes”")


@cache
def _trained(style_name: str) -> Tokenizer:
    """A ``tokenizers`` BPE of this style, trained once per session."""
    style = STYLES[style_name]
    tok = Tokenizer(models.BPE(unk_token=style.unk if not style.byte_level else None))
    if style.byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=list(style.specials),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts(), trainer=trainer)
    if style.add_bos:
        assert style.bos is not None
        bos_id = tok.token_to_id(style.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{style.bos} $A",
            pair=f"{style.bos} $A {style.bos} $B",
            special_tokens=[(style.bos, bos_id)],
        )
    elif style.byte_level:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def family_tokenizer(style_name: str) -> PreTrainedTokenizerFast:
    """The style's tokenizer as transformers wraps it (special tokens named)."""
    style = STYLES[style_name]
    names: dict[str, Any] = {"eos_token": style.eos}
    for attr in ("bos", "pad", "unk"):
        value = getattr(style, attr)
        if value is not None:
            names[f"{attr}_token"] = value
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained(style_name).to_str()),
        additional_special_tokens=list(style.extra),
        model_max_length=4096,
        **names,
    )
    if style.chat_template is not None:
        tok.chat_template = style.chat_template
    return tok


def family_config(family: Family, *, vocab_size: int, student: bool = False) -> Any:
    """The family's config class at its tiny shape, token ids from its tokenizer."""
    tok = family_tokenizer(family.style)
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    cls = getattr(transformers, family.config_class)
    shape = family.student_shape if student else family.shape
    return cls(vocab_size=vocab_size, **shape, **ids)


def save_family_model(
    family: Family,
    folder: Path,
    *,
    seed: int,
    student: bool = False,
    vocab_rows: int | None = None,
    tokenizer_of: Family | None = None,
) -> Path:
    """Build the family's model from its config (seeded), save it with its tokenizer.

    ``vocab_rows`` sets the embedding rows (padded or short vocabularies); ``tokenizer_of``
    saves another family's tokenizer instead (a cross-family pair sharing one tokenizer).
    """
    tok_family = tokenizer_of or family
    tok = family_tokenizer(tok_family.style)
    rows = vocab_rows if vocab_rows is not None else len(tok)
    config = family_config(family, vocab_size=rows, student=student)
    if tokenizer_of is not None:
        config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
        config.pad_token_id = tok.pad_token_id
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    style = STYLES[tok_family.style]
    if style.tokenizer_class is not None:
        tok_config = tmp / "tokenizer_config.json"
        fields = json.loads(tok_config.read_text())
        tok_config.write_text(json.dumps({**fields, "tokenizer_class": style.tokenizer_class}))
    (tmp / "zoo.json").write_text(json.dumps({"family": family.name, "seed": seed}))
    tmp.rename(folder)
    return folder


class Zoo:
    """Models built on first use into ``root`` and reused for the session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _get(self, name: str, **build: Any) -> Path:
        folder = self.root / name
        if not folder.is_dir():
            save_family_model(folder=folder, **build)
        return folder

    def teacher(self, family: str) -> Path:
        return self._get(f"{family}-teacher", family=FAMILIES[family], seed=0)

    def student(self, family: str, *, tokenizer_of: str | None = None) -> Path:
        """A smaller pretrained (random) student of ``family``, with its own tokenizer or
        the one of family ``tokenizer_of``."""
        other = None if tokenizer_of is None else FAMILIES[tokenizer_of]
        suffix = "" if tokenizer_of is None else f"-tok-{tokenizer_of}"
        return self._get(
            f"{family}-student{suffix}",
            family=FAMILIES[family],
            seed=1,
            student=True,
            tokenizer_of=other,
        )

    def padded(self, family: str, extra_rows: int, *, student: bool = False) -> Path:
        """The family's model with ``len(tokenizer) + extra_rows`` embedding rows (negative:
        fewer rows than the tokenizer has tokens)."""
        n = len(family_tokenizer(FAMILIES[family].style))
        return self._get(
            f"{family}-{'student' if student else 'teacher'}-rows{n + extra_rows}",
            family=FAMILIES[family],
            seed=2 if student else 0,
            student=student,
            vocab_rows=n + extra_rows,
        )
